//! The image tarball BuildKit's `type=docker` exporter writes: an OCI image layout (`oci-layout`,
//! `index.json`, `blobs/sha256/*`) that is also a `docker load` archive (`manifest.json` with
//! `RepoTags`). `skopeo`, `docker load` and `ctr images import` all read it.

use std::collections::BTreeMap;
use std::io::{self, Write};

use serde::Serialize;

use crate::content::{self, ContentStore};
use crate::oci::{media_types, Descriptor, ImageIndex, ImageManifest};
use crate::reference::Reference;
use crate::Digest;

/// Annotation with the full image name on `index.json` descriptors (containerd's import reads it).
pub const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";
/// Annotation with the tag on `index.json` descriptors (OCI layout's reference name).
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An archive export failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A blob could not be read from the content store.
    #[error("failed to read blob {digest} for the archive")]
    Content {
        /// The blob.
        digest: Digest,
        /// The cause.
        #[source]
        source: content::Error,
    },
    /// The manifest does not parse.
    #[error("failed to parse manifest {digest}")]
    Manifest {
        /// The manifest.
        digest: Digest,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The descriptor is an index: a docker archive holds one platform.
    #[error("docker exporter does not currently support exporting manifest lists ({digest})")]
    ManifestList {
        /// The index.
        digest: Digest,
    },
    /// An index inside the exported index: kiln writes one level of platforms.
    #[error("nested image index {digest} cannot be archived")]
    NestedIndex {
        /// The inner index.
        digest: Digest,
    },
    /// Encoding `index.json` or `manifest.json` failed.
    #[error("failed to encode {file}")]
    Encode {
        /// The file being encoded.
        file: &'static str,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// Writing the tar failed.
    #[error("failed to write archive entry {entry}")]
    Write {
        /// The entry being written.
        entry: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Result of archive operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One image of docker's `manifest.json`.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    repo_tags: Vec<String>,
    layers: Vec<String>,
}

#[derive(Serialize)]
struct OciLayout {
    #[serde(rename = "imageLayoutVersion")]
    image_layout_version: &'static str,
}

fn blob_path(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

/// Annotation with the creation time on `index.json` descriptors, as BuildKit's tarball exporters
/// write it.
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";

/// What kind of tarball [`write_archive`] writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveOptions {
    /// Also write docker's `manifest.json` (the `docker` exporter); the `oci` exporter does not.
    pub docker_manifest: bool,
    /// The value of [`ANNOTATION_CREATED`] on each `index.json` descriptor (RFC 3339), if any.
    pub created: Option<String>,
}

/// Writes the image `manifest` (whose manifest, config and layer blobs are in `store`) as a
/// docker/OCI archive to `out`, named `names`: [`write_archive`] with a docker `manifest.json`
/// and no creation annotation.
pub fn write_docker_archive(
    out: impl Write,
    store: &ContentStore,
    manifest: &Descriptor,
    names: &[Reference],
) -> Result<()> {
    let options = ArchiveOptions {
        docker_manifest: true,
        created: None,
    };
    write_archive(out, store, manifest, names, &options)
}

/// Writes the image `manifest` (whose manifest, config and layer blobs are in `store`) as an OCI
/// image layout tar to `out`, named `names`.
///
/// `index.json` has one descriptor per name (annotated with [`ANNOTATION_IMAGE_NAME`] = full name
/// and [`ANNOTATION_REF_NAME`] = tag, and [`ANNOTATION_CREATED`] when given), or one descriptor
/// without names; with `docker_manifest`, docker's `manifest.json` lists the familiar `name:tag`
/// of every tagged name. Entries are sorted by path with fixed metadata, so the same inputs give
/// the same bytes. `manifest` may be an image index (a multi-platform image; not with
/// `docker_manifest`, a docker archive holds one platform): `index.json` then names the index
/// and the archive holds every platform's manifest, config and layers.
pub fn write_archive(
    out: impl Write,
    store: &ContentStore,
    manifest: &Descriptor,
    names: &[Reference],
    options: &ArchiveOptions,
) -> Result<()> {
    let read = |digest: &Digest| {
        store.read(digest).map_err(|source| Error::Content {
            digest: digest.clone(),
            source,
        })
    };
    let parse_manifest = |digest: &Digest| -> Result<(ImageManifest, bool)> {
        let bytes = read(digest)?;
        let image: ImageManifest =
            serde_json::from_slice(&bytes).map_err(|source| Error::Manifest {
                digest: digest.clone(),
                source,
            })?;
        let nested = image
            .media_type
            .as_deref()
            .is_some_and(media_types::is_index);
        Ok((image, nested))
    };
    // The images the archive holds: the one manifest, or every manifest of an index (the `oci`
    // exporter's multi-platform tarball; index.json then names the index, as BuildKit's does).
    let mut images = Vec::new();
    let mut blobs: Vec<&Digest> = vec![&manifest.digest];
    let index_children;
    if media_types::is_index(&manifest.media_type) {
        if options.docker_manifest {
            return Err(Error::ManifestList {
                digest: manifest.digest.clone(),
            });
        }
        let bytes = read(&manifest.digest)?;
        let index: ImageIndex =
            serde_json::from_slice(&bytes).map_err(|source| Error::Manifest {
                digest: manifest.digest.clone(),
                source,
            })?;
        index_children = index.manifests;
        for child in &index_children {
            if !media_types::is_manifest(&child.media_type) {
                return Err(Error::NestedIndex {
                    digest: child.digest.clone(),
                });
            }
            blobs.push(&child.digest);
            images.push(parse_manifest(&child.digest)?.0);
        }
    } else {
        let (image, nested) = parse_manifest(&manifest.digest)?;
        if nested {
            return Err(Error::ManifestList {
                digest: manifest.digest.clone(),
            });
        }
        images.push(image);
    }

    let mut base = manifest.clone();
    if let Some(created) = &options.created {
        base.annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(ANNOTATION_CREATED.to_owned(), created.clone());
    }
    let mut descriptors = Vec::new();
    for name in names {
        let mut desc = base.clone();
        let annotations = desc.annotations.get_or_insert_with(BTreeMap::new);
        annotations.insert(ANNOTATION_IMAGE_NAME.to_owned(), name.to_string());
        if let Some(tag) = name.tag() {
            annotations.insert(ANNOTATION_REF_NAME.to_owned(), tag.to_owned());
        }
        descriptors.push(desc);
    }
    if descriptors.is_empty() {
        descriptors.push(base);
    }
    let index = ImageIndex {
        schema_version: 2,
        media_type: Some(media_types::OCI_INDEX.to_owned()),
        manifests: descriptors,
        annotations: None,
    };
    let mut repo_tags: Vec<String> = names
        .iter()
        .filter_map(|n| n.tag().and_then(|t| n.with_tag(t).ok()))
        .map(|n| n.familiar())
        .collect();
    let docker_manifest: Vec<DockerManifestEntry> = images
        .iter()
        .map(|image| DockerManifestEntry {
            config: blob_path(&image.config.digest),
            repo_tags: std::mem::take(&mut repo_tags),
            layers: image.layers.iter().map(|l| blob_path(&l.digest)).collect(),
        })
        .collect();
    let index_json = encode("index.json", &index)?;
    let manifest_json = encode("manifest.json", &docker_manifest)?;
    let layout_json = encode(
        "oci-layout",
        &OciLayout {
            image_layout_version: "1.0.0",
        },
    )?;

    for image in &images {
        blobs.push(&image.config.digest);
        blobs.extend(image.layers.iter().map(|l| &l.digest));
    }
    blobs.sort();
    blobs.dedup();

    let mut tar = tar::Builder::new(out);
    append_dir(&mut tar, "blobs/")?;
    append_dir(&mut tar, "blobs/sha256/")?;
    for digest in blobs {
        let path = blob_path(digest);
        let size = store.info(digest).map_err(|source| Error::Content {
            digest: digest.clone(),
            source,
        })?;
        let file = store.open_blob(digest).map_err(|source| Error::Content {
            digest: digest.clone(),
            source,
        })?;
        append_file(&mut tar, &path, size, file)?;
    }
    append_file(
        &mut tar,
        "index.json",
        index_json.len() as u64,
        &index_json[..],
    )?;
    if options.docker_manifest {
        append_file(
            &mut tar,
            "manifest.json",
            manifest_json.len() as u64,
            &manifest_json[..],
        )?;
    }
    append_file(
        &mut tar,
        "oci-layout",
        layout_json.len() as u64,
        &layout_json[..],
    )?;
    let mut out = tar.into_inner().map_err(|source| Error::Write {
        entry: "end of archive".to_owned(),
        source,
    })?;
    out.flush().map_err(|source| Error::Write {
        entry: "end of archive".to_owned(),
        source,
    })
}

fn encode<T: Serialize>(file: &'static str, value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|source| Error::Encode { file, source })
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    h
}

fn append_dir<W: Write>(tar: &mut tar::Builder<W>, path: &str) -> Result<()> {
    let mut h = header(tar::EntryType::Directory, 0o755, 0);
    tar.append_data(&mut h, path, io::empty())
        .map_err(|source| Error::Write {
            entry: path.to_owned(),
            source,
        })
}

fn append_file<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    size: u64,
    data: impl io::Read,
) -> Result<()> {
    let mut h = header(tar::EntryType::Regular, 0o444, size);
    tar.append_data(&mut h, path, data)
        .map_err(|source| Error::Write {
            entry: path.to_owned(),
            source,
        })
}
