//! placeholder: owned by the rootfs work.
use std::path::PathBuf;
pub fn build() -> Result<PathBuf, String> {
    Err("rootfs build not written yet".into())
}
