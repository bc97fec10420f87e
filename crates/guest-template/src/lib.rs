//! Builds the tiny Debian guest template offline from Debian packages
#![forbid(unsafe_code)]
