//! VHD (Virtual PC / Hyper-V 2008) image format: fixed, dynamic, differencing
#![forbid(unsafe_code)]
