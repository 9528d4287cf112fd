//! Images built on the spot, with no registry: `FROM scratch` plus one binary and the shared
//! libraries `ldd` names for it, sent to the engine as an in-memory tar build context. The tag
//! carries a hash of every file, so a second run with the same binaries finds the image and
//! does not build again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Instant;

use bollard::query_parameters::{BuildImageOptionsBuilder, ListImagesOptionsBuilder};
use bollard::Docker;
use futures::StreamExt;

use crate::pilot_client::Error;

/// Label on the images meshbench builds (kept between runs as a cache).
pub const IMAGE_LABEL: &str = "meshbench.image";

pub(crate) fn engine_error(what: &str, e: bollard::errors::Error) -> Error {
    Error::Environment(format!("docker: {what}: {e}"))
}

/// Bumped when the image layout changes, so old cached images are not reused.
const LAYOUT: u32 = 1;

const DOCKERFILE: &str = "FROM scratch\nCOPY rootfs/ /\n";

/// What `ensure` did.
#[derive(Clone, Debug)]
pub struct Built {
    pub tag: String,
    /// Seconds the build took; `None` when the cached image was used.
    pub build_s: Option<f64>,
}

/// Makes sure an image named `name` holding each binary at its path in the image (plus
/// their libraries) exists; returns its tag.
pub async fn ensure(
    docker: &Docker,
    name: &str,
    binaries: &[(&Path, &str)],
) -> Result<Built, Error> {
    let mut files = BTreeMap::new();
    for (binary, dest) in binaries {
        files.extend(rootfs(binary, dest)?);
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    LAYOUT.hash(&mut h);
    files.hash(&mut h);
    let tag = format!("meshbench-local/{name}:{:016x}", h.finish());
    if docker.inspect_image(&tag).await.is_ok() {
        return Ok(Built { tag, build_s: None });
    }
    let started = Instant::now();
    let context = build_context(&files)?;
    let labels = HashMap::from([(IMAGE_LABEL.to_string(), name.to_string())]);
    let options = BuildImageOptionsBuilder::default()
        .dockerfile("Dockerfile")
        .t(&tag)
        .rm(true)
        .forcerm(true)
        .labels(&labels)
        .build();
    let mut stream = docker.build_image(options, None, Some(bollard::body_full(context.into())));
    while let Some(msg) = stream.next().await {
        let info = msg.map_err(|e| engine_error(&format!("building image {tag}"), e))?;
        if let Some(detail) = info.error_detail {
            return Err(Error::Environment(format!(
                "building image {tag}: {}",
                detail.message.unwrap_or_default()
            )));
        }
    }
    let build_s = started.elapsed().as_secs_f64();
    prune(docker, name, &tag).await;
    Ok(Built {
        tag,
        build_s: Some(build_s),
    })
}

/// Removes earlier builds of `name` (other binaries) so rebuilt binaries do not pile up
/// images; one still used by a container stays.
async fn prune(docker: &Docker, name: &str, keep: &str) {
    let filters = HashMap::from([("label".to_string(), vec![format!("{IMAGE_LABEL}={name}")])]);
    let Ok(images) = docker
        .list_images(Some(
            ListImagesOptionsBuilder::default()
                .filters(&filters)
                .build(),
        ))
        .await
    else {
        return;
    };
    for i in images {
        if !i.repo_tags.iter().any(|t| t == keep) {
            let _ = docker
                .remove_image(
                    &i.id,
                    None::<bollard::query_parameters::RemoveImageOptions>,
                    None,
                )
                .await;
        }
    }
}

/// Files of the image (path in the image -> content): the binary and every library the
/// dynamic loader would map for it, at the paths `ldd` gives.
fn rootfs(binary: &Path, dest: &str) -> Result<BTreeMap<String, Vec<u8>>, Error> {
    let read = |p: &Path| {
        std::fs::read(p)
            .map_err(|e| Error::Environment(format!("cannot read {}: {e}", p.display())))
    };
    let mut files = BTreeMap::new();
    files.insert(dest.to_string(), read(binary)?);
    // Names resolve from the hosts file first (captured pods map service names to VIPs
    // there; without this file glibc asks DNS first).
    files.insert("/etc/nsswitch.conf".into(), b"hosts: files dns\n".to_vec());
    for lib in shared_libraries(binary)? {
        let content = read(&lib)?;
        files.insert(lib.to_string_lossy().into_owned(), content);
    }
    Ok(files)
}

/// Absolute paths `ldd` prints for `binary` (none for a static binary).
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, Error> {
    let out = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| Error::Environment(format!("cannot run ldd (from libc-bin): {e}")))?;
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

/// `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and `/lib64/ld-linux-x86-64.so.2
/// (0x...)` give a path; `linux-vdso.so.1 (0x...)` (in the kernel) does not.
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l.split_once("=>").map_or(l, |(_, r)| r.trim());
            let path = l.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// The build context: the Dockerfile and `rootfs/` with every file and its directories.
fn build_context(files: &BTreeMap<String, Vec<u8>>) -> Result<Vec<u8>, Error> {
    let mut tar = Tar::default();
    tar.file("Dockerfile", DOCKERFILE.as_bytes(), 0o644)?;
    let mut dirs = BTreeSet::from(["rootfs/".to_string(), "rootfs/tmp/".to_string()]);
    for path in files.keys() {
        let mut at = String::from("rootfs");
        for part in path
            .trim_start_matches('/')
            .split('/')
            .collect::<Vec<_>>()
            .iter()
            .rev()
            .skip(1)
            .rev()
        {
            at = format!("{at}/{part}");
            dirs.insert(format!("{at}/"));
        }
    }
    for d in &dirs {
        let mode = if d == "rootfs/tmp/" { 0o1777 } else { 0o755 };
        tar.entry(d, &[], mode, b'5')?;
    }
    for (path, content) in files {
        tar.file(&format!("rootfs{path}"), content, 0o755)?;
    }
    Ok(tar.finish())
}

/// A minimal ustar writer: regular files and directories, which is all a build context needs.
#[derive(Default)]
struct Tar {
    out: Vec<u8>,
}

impl Tar {
    fn file(&mut self, path: &str, content: &[u8], mode: u32) -> Result<(), Error> {
        self.entry(path, content, mode, b'0')
    }

    fn entry(&mut self, path: &str, content: &[u8], mode: u32, kind: u8) -> Result<(), Error> {
        let mut h = [0u8; 512];
        // Names over 100 bytes go in `prefix` (155 bytes), split at a '/'.
        let (prefix, name) = if path.len() <= 100 {
            ("", path)
        } else {
            let cut = path[..path.len().min(156)]
                .rfind('/')
                .filter(|&i| path.len() - i - 1 <= 100)
                .ok_or_else(|| Error::Environment(format!("path too long for tar: {path}")))?;
            (&path[..cut], &path[cut + 1..])
        };
        h[..name.len()].copy_from_slice(name.as_bytes());
        octal(&mut h[100..108], mode as u64);
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], content.len() as u64);
        octal(&mut h[136..148], 0);
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|b| *b as u64).sum();
        octal(&mut h[148..155], sum);
        h[155] = b' ';
        self.out.extend_from_slice(&h);
        self.out.extend_from_slice(content);
        let pad = (512 - content.len() % 512) % 512;
        self.out.resize(self.out.len() + pad, 0);
        Ok(())
    }

    fn finish(mut self) -> Vec<u8> {
        self.out.resize(self.out.len() + 1024, 0);
        self.out
    }
}

/// Zero-padded octal filling the field but its last byte (NUL).
fn octal(field: &mut [u8], v: u64) {
    let n = field.len() - 1;
    let s = format!("{v:0n$o}");
    field[..n].copy_from_slice(&s.as_bytes()[s.len() - n..]);
    field[n] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffc)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n\tlibfoo.so => not found\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }

    /// The context is a tar that the system's tar lists with the right names and sizes.
    #[test]
    fn tar_is_readable_by_tar() {
        let mut files = BTreeMap::new();
        files.insert("/meshbench".to_string(), vec![7u8; 1000]);
        let long = format!("/lib/{}/libx.so", "d".repeat(120));
        files.insert(long.clone(), vec![1u8; 10]);
        let bytes = build_context(&files).unwrap();
        let dir = std::env::temp_dir().join(format!("meshbench-tar-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctx.tar");
        std::fs::write(&path, &bytes).unwrap();
        let out = std::process::Command::new("tar")
            .arg("-tvf")
            .arg(&path)
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&out.stdout).into_owned();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(listing.contains("Dockerfile"), "{listing}");
        assert!(
            listing.contains(" 1000 ") && listing.contains("rootfs/meshbench"),
            "{listing}"
        );
        assert!(listing.contains(&format!("rootfs{long}")), "{listing}");
        assert!(
            listing.contains("drwxrwxrwt") && listing.contains("rootfs/tmp/"),
            "{listing}"
        );
    }
}
