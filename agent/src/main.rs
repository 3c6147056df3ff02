//! placeholder; replaced by its owner
fn main() {}
