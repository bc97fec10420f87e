//! VHDX image format ([MS-VHDX]) with its metadata log
#![forbid(unsafe_code)]
