//! placeholder: owned by the kernel work.
use std::path::PathBuf;
pub fn build() -> Result<PathBuf, String> {
    Err("kernel build not written yet".into())
}
