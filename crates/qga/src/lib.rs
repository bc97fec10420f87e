//! qemu-guest-agent client
#![forbid(unsafe_code)]
