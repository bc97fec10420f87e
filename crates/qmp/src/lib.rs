//! QEMU Machine Protocol client
#![forbid(unsafe_code)]
