//! NBD server exporting a BlockDevice
#![forbid(unsafe_code)]
