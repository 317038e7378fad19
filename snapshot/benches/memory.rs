//! Memory-file write benchmark (filled in below).
fn main() {}
