use std::path::{Path, PathBuf};

/// Which directories a parent locator may point into. A locator is data from an image
/// file, so it must never make us open an arbitrary host file.
#[derive(Debug, Clone, Default)]
pub struct PathPolicy {
    allowed: Vec<PathBuf>,
    /// Also allow the directory of the image being opened (the usual case).
    pub allow_image_dir: bool,
}

impl PathPolicy {
    /// Only the opened image's own directory.
    pub fn image_dir_only() -> Self {
        PathPolicy {
            allowed: Vec::new(),
            allow_image_dir: true,
        }
    }

    pub fn allow(mut self, dir: impl AsRef<Path>) -> Self {
        let d = dir.as_ref();
        self.allowed
            .push(d.canonicalize().unwrap_or_else(|_| d.to_path_buf()));
        self
    }

    /// Is `candidate` (already canonicalised) inside an allowed directory, given the
    /// directory of the top image?
    pub fn permits(&self, candidate: &Path, top_dir: &Path) -> bool {
        if self.allow_image_dir {
            let top = top_dir
                .canonicalize()
                .unwrap_or_else(|_| top_dir.to_path_buf());
            if candidate.starts_with(&top) {
                return true;
            }
        }
        self.allowed.iter().any(|d| candidate.starts_with(d))
    }
}
