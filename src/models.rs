//! Model references (DESIGN.md §5): `category/filename` on the command line, `{"category",
//! "filename"}` in JSON. The category is a key or a folder name; the filename is relative to
//! that folder. Absolute paths, `..` components and NUL bytes are refused; a reference that
//! names nothing on the NAS is `not_found` (an answer, not an error).

use std::path::{Path, PathBuf};

use crate::policy::{category_folders, category_key};
use crate::source::Nas;

/// A validated reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct ModelRef {
    /// Category key.
    pub category: String,
    /// Path below the category folder, `/`-separated.
    pub filename: String,
}

/// Why a reference is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RefError {
    /// Empty category or filename.
    #[error("empty category or filename")]
    Empty,
    /// An absolute path.
    #[error("absolute paths are not model references: {0:?}")]
    Absolute(String),
    /// A `..` component.
    #[error("'..' is not allowed in model references: {0:?}")]
    Parent(String),
    /// A NUL byte.
    #[error("NUL bytes are not allowed in model references")]
    Nul,
    /// No `/` between category and filename.
    #[error("expected category/filename, got {0:?}")]
    NoCategory(String),
}

/// Validates a (category, filename) pair. Windows separators are accepted.
pub fn parse(category: &str, filename: &str) -> Result<ModelRef, RefError> {
    if category.contains('\0') || filename.contains('\0') {
        return Err(RefError::Nul);
    }
    let filename = filename.replace('\\', "/");
    let category = category.trim_matches('/');
    if category.is_empty() || filename.trim_matches('/').is_empty() {
        return Err(RefError::Empty);
    }
    if filename.starts_with('/')
        || category.contains('/')
        || filename.as_bytes().get(1) == Some(&b':')
    {
        return Err(RefError::Absolute(filename));
    }
    let parts: Vec<&str> = filename
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.contains(&"..") || category == ".." || category == "." {
        return Err(RefError::Parent(format!("{category}/{filename}")));
    }
    Ok(ModelRef {
        category: category_key(category).to_string(),
        filename: parts.join("/"),
    })
}

/// Validates `category/filename` as written on the command line or in an allow-list.
pub fn parse_path(s: &str) -> Result<ModelRef, RefError> {
    if s.contains('\0') {
        return Err(RefError::Nul);
    }
    let unix = s.replace('\\', "/");
    if unix.starts_with('/') {
        return Err(RefError::Absolute(s.to_string()));
    }
    let (cat, file) = unix
        .split_once('/')
        .ok_or_else(|| RefError::NoCategory(s.to_string()))?;
    parse(cat, file)
}

impl ModelRef {
    /// NAS-relative paths ComfyUI would try, in its order.
    pub fn candidates(&self) -> Vec<PathBuf> {
        let own = [self.category.as_str()];
        let folders = match category_folders(&self.category) {
            [] => &own[..],
            f => f,
        };
        folders
            .iter()
            .map(|f| Path::new(f).join(&self.filename))
            .collect()
    }

    /// The first candidate that is a regular file on the NAS.
    pub fn resolve(&self, nas: &Nas) -> Option<PathBuf> {
        self.candidates().into_iter().find(|p| {
            nas.stat(p)
                .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG)
        })
    }
}

/// Reads an allow-list: one reference per line, `#` comments. Returns the references and a
/// warning per bad line (with its number).
pub fn read_list(text: &str) -> (Vec<ModelRef>, Vec<String>) {
    let mut refs = Vec::new();
    let mut warnings = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        match parse_path(line) {
            Ok(r) => refs.push(r),
            Err(e) => warnings.push(format!("line {}: {e}", i + 1)),
        }
    }
    (refs, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_references() {
        let r = parse_path("unet/flux/dev.safetensors").unwrap();
        assert_eq!(r.category, "diffusion_models");
        assert_eq!(r.filename, "flux/dev.safetensors");
        assert_eq!(
            r.candidates(),
            [
                PathBuf::from("unet/flux/dev.safetensors"),
                PathBuf::from("diffusion_models/flux/dev.safetensors")
            ]
        );
        assert_eq!(
            parse("loras", "sub\\x.safetensors").unwrap().filename,
            "sub/x.safetensors"
        );
        assert_eq!(parse_path("vae/./a.pt").unwrap().filename, "a.pt");
    }

    #[test]
    fn refused_references() {
        assert_eq!(
            parse_path("/etc/passwd"),
            Err(RefError::Absolute("/etc/passwd".into()))
        );
        assert!(matches!(
            parse_path("loras/../../etc/passwd"),
            Err(RefError::Parent(_))
        ));
        assert!(matches!(parse("..", "x"), Err(RefError::Parent(_))));
        assert!(matches!(parse("loras", "/abs"), Err(RefError::Absolute(_))));
        assert!(matches!(
            parse("loras", "C:\\\\x"),
            Err(RefError::Absolute(_))
        ));
        assert_eq!(parse("loras", "a\0b"), Err(RefError::Nul));
        assert_eq!(parse("", "x"), Err(RefError::Empty));
        assert_eq!(parse("loras", ""), Err(RefError::Empty));
        assert!(matches!(
            parse_path("justafile"),
            Err(RefError::NoCategory(_))
        ));
    }

    #[test]
    fn resolve_in_comfyui_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("diffusion_models")).unwrap();
        std::fs::write(dir.path().join("diffusion_models/m.gguf"), "x").unwrap();
        let nas = Nas::open(dir.path()).unwrap();
        let r = parse_path("diffusion_models/m.gguf").unwrap();
        assert_eq!(
            r.resolve(&nas),
            Some(PathBuf::from("diffusion_models/m.gguf"))
        );
        std::fs::create_dir_all(dir.path().join("unet")).unwrap();
        std::fs::write(dir.path().join("unet/m.gguf"), "y").unwrap();
        assert_eq!(r.resolve(&nas), Some(PathBuf::from("unet/m.gguf")));
        assert_eq!(
            parse_path("loras/none.safetensors").unwrap().resolve(&nas),
            None
        );
    }

    #[test]
    fn allow_list() {
        let (refs, warnings) = read_list("# models\nloras/a.safetensors\n\n/etc/x\nvae/b.pt # c\n");
        assert_eq!(refs.len(), 2);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].starts_with("line 4"));
    }
}
