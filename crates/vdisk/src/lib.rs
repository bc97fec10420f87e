//! Open any image, resolve differencing chains, and the disk operations (convert, compact, resize, merge, set-parent, check)
#![forbid(unsafe_code)]
