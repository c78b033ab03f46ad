//! `--model ORG/NAME[@REVISION]`: a model of the Hugging Face Hub, as vLLM
//! takes one. A `--model` that is not an existing directory but has the form
//! of a Hub repository id is looked up in the Hugging Face cache
//! (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`; the
//! layout `huggingface_hub` writes: `models--ORG--NAME/refs/REVISION` holding
//! a commit hash, `models--ORG--NAME/snapshots/HASH/FILES`). A complete
//! snapshot there is used as it is, without touching the network. Otherwise,
//! unless `HF_HUB_OFFLINE` is set, the checkpoint's files are downloaded into
//! that cache with the `hf-hub` crate (its sync API over ureq and rustls):
//! config.json, the tokenizer files, generation_config.json when the
//! repository has one, and the weights (model.safetensors.index.json and the
//! shards it names, else the `*.safetensors` files). `HF_ENDPOINT` and
//! `HF_TOKEN` (else the cache's `token` file) are honoured.

use crate::{CliError, CliResult};
use std::path::{Path, PathBuf};

/// A Hub model id: `org/name`, with an optional `@revision` (a branch, a tag
/// or a commit hash; default `main`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: Option<String>,
}

impl HubId {
    /// `org/name` or `org/name@revision`, each part made of ASCII letters,
    /// digits, `-`, `_` and `.` (not starting or ending with `.` or `-`, no
    /// `..`): the Hub's rules for repository ids. Anything else (an absolute
    /// or deeper path, `./x`, a name without an organisation) is not one.
    pub fn parse(spec: &str) -> Option<HubId> {
        let (repo, revision) = match spec.split_once('@') {
            Some((repo, rev)) => {
                let ok = !rev.is_empty()
                    && rev.len() <= 255
                    && !rev.contains("..")
                    && !rev.starts_with('/')
                    && rev
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
                if !ok {
                    return None;
                }
                (repo, Some(rev.to_string()))
            }
            None => (spec, None),
        };
        let (org, name) = repo.split_once('/')?;
        let part = |p: &str| {
            !p.is_empty()
                && p.len() <= 96
                && !p.contains("..")
                && !p.starts_with(['.', '-'])
                && !p.ends_with(['.', '-'])
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        (part(org) && part(name)).then(|| HubId {
            repo: repo.to_string(),
            revision,
        })
    }

    fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }

    /// `models--org--name`, the cache's folder for the repository.
    fn folder(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.revision {
            Some(rev) => write!(f, "{}@{rev}", self.repo),
            None => f.write_str(&self.repo),
        }
    }
}

/// `--model PATH` as the checkpoint directory to read: PATH itself, or the
/// snapshot of the Hub model it names ([`hub_id`]).
pub fn resolve_path(model: PathBuf) -> CliResult<PathBuf> {
    match hub_id(&model) {
        Some(id) => resolve(&id),
        None => Ok(model),
    }
}

/// The name servers give `--model PATH`: the repository id of a Hub model
/// (`org/name`, as vLLM names it), else the directory's name.
pub fn served_name(model: &Path) -> String {
    match hub_id(model) {
        Some(id) => id.repo,
        None => remask_cluster::coordinator::model_name(&model.display().to_string()),
    }
}

/// The `--model` value as a Hub id, when it should be one: not an existing
/// path, and of the form `org/name[@revision]`.
pub fn hub_id(model: &Path) -> Option<HubId> {
    if model.exists() {
        return None;
    }
    HubId::parse(model.to_str()?)
}

/// The Hugging Face hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` (as `huggingface_hub` finds it).
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(dir) = var("HF_HUB_CACHE") {
        return Some(dir.into());
    }
    if let Some(home) = var("HF_HOME") {
        return Some(PathBuf::from(home).join("hub"));
    }
    let base = match var("XDG_CACHE_HOME") {
        Some(x) => PathBuf::from(x),
        None => dirs::home_dir()?.join(".cache"),
    };
    Some(base.join("huggingface").join("hub"))
}

/// `HF_HUB_OFFLINE` set to a true value (`1`, `true`, `yes`, `on`):
/// never download.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// The cached snapshot of `id` with a complete checkpoint in it, if any:
/// `snapshots/REV` when the revision is a commit hash found there, else
/// `snapshots/<refs/REV>`.
pub fn cached_snapshot(cache: &Path, id: &HubId) -> Option<PathBuf> {
    let repo = cache.join(id.folder());
    let rev = id.revision();
    let direct = repo.join("snapshots").join(rev);
    let is_hash = rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit());
    let snapshot = if is_hash && direct.is_dir() {
        direct
    } else {
        let hash = std::fs::read_to_string(repo.join("refs").join(rev)).ok()?;
        let hash = hash.trim();
        if hash.is_empty() || hash.contains(['/', '\\']) || hash.contains("..") {
            return None;
        }
        repo.join("snapshots").join(hash)
    };
    complete(&snapshot).then_some(snapshot)
}

/// A checkpoint directory remask can load: config.json, tokenizer.json and
/// the weights (every shard the index names, or model.safetensors).
fn complete(dir: &Path) -> bool {
    if !dir.join("config.json").is_file() || !dir.join("tokenizer.json").is_file() {
        return false;
    }
    match std::fs::read_to_string(dir.join("model.safetensors.index.json")) {
        Ok(text) => match index_shards(&text) {
            Some(shards) => !shards.is_empty() && shards.iter().all(|s| dir.join(s).is_file()),
            None => false,
        },
        Err(_) => dir.join("model.safetensors").is_file(),
    }
}

/// The shard file names of a safetensors index (plain file names only).
fn index_shards(text: &str) -> Option<Vec<String>> {
    let index: serde_json::Value = serde_json::from_str(text).ok()?;
    let mut shards: Vec<String> = index
        .get("weight_map")?
        .as_object()?
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    shards.sort();
    shards.dedup();
    shards
        .iter()
        .all(|s| !s.is_empty() && !s.contains(['/', '\\']) && s != "..")
        .then_some(shards)
}

/// The checkpoint directory of `id`: the cached snapshot, else (online) a
/// fresh download into the cache. Exit code 2 with a message naming the
/// repository when it cannot be had.
pub fn resolve(id: &HubId) -> CliResult<PathBuf> {
    let cache = cache_dir().ok_or_else(|| {
        CliError::Usage(format!(
            "--model {id}: no Hugging Face cache directory is known for this user (set HF_HUB_CACHE or HF_HOME)"
        ))
    })?;
    if let Some(dir) = cached_snapshot(&cache, id) {
        return Ok(dir);
    }
    if offline() {
        return Err(CliError::Usage(format!(
            "--model {id}: not a directory, and the Hugging Face model {} (revision {}) is not in the cache {} (HF_HUB_OFFLINE is set: nothing is downloaded)",
            id.repo,
            id.revision(),
            cache.display()
        )));
    }
    download(&cache, id)
}

/// Downloads the checkpoint files of `id` into `cache`; returns the snapshot.
fn download(cache: &Path, id: &HubId) -> CliResult<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Cache, Repo, RepoType};
    use std::io::IsTerminal;

    let fail = |what: &str, e: &dyn std::fmt::Display| {
        CliError::Usage(format!(
            "--model {id}: not a directory, and cannot {what} the Hugging Face model {} (revision {}): {e}",
            id.repo,
            id.revision()
        ))
    };
    let mut builder = ApiBuilder::from_cache(Cache::new(cache.to_path_buf()))
        .with_progress(std::io::stderr().is_terminal())
        .with_retries(2)
        .with_user_agent("remask", env!("CARGO_PKG_VERSION"));
    if let Some(endpoint) = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()) {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build().map_err(|e| fail("reach", &e))?;
    let repo = api.repo(Repo::with_revision(
        id.repo.clone(),
        RepoType::Model,
        id.revision().to_string(),
    ));
    let info = repo.info().map_err(|e| fail("find", &e))?;
    let files: Vec<String> = info
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .filter(|f| !f.contains('/'))
        .collect();
    let has = |f: &str| files.iter().any(|x| x == f);
    for required in ["config.json", "tokenizer.json"] {
        if !has(required) {
            return Err(fail(
                "use",
                &format!("the repository has no {required} (not a checkpoint remask loads)"),
            ));
        }
    }
    let mut wanted: Vec<String> = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ]
    .into_iter()
    .filter(|f| has(f))
    .map(str::to_string)
    .collect();
    let get = |f: &str| {
        eprintln!("remask: downloading {f} of {id}");
        repo.download(f)
            .map_err(|e| fail(&format!("download {f} of"), &e))
    };
    let mut snapshot = None;
    if has("model.safetensors.index.json") {
        let index = get("model.safetensors.index.json")?;
        let text = std::fs::read_to_string(&index).map_err(|e| fail("read the index of", &e))?;
        let shards = index_shards(&text).ok_or_else(|| {
            fail(
                "use",
                &"model.safetensors.index.json has no weight_map of plain file names",
            )
        })?;
        snapshot = index.parent().map(Path::to_path_buf);
        wanted.extend(shards);
    } else {
        let weights: Vec<String> = files
            .iter()
            .filter(|f| f.ends_with(".safetensors"))
            .cloned()
            .collect();
        if weights.is_empty() {
            return Err(fail(
                "use",
                &"the repository has no .safetensors weights (remask reads safetensors only)",
            ));
        }
        wanted.extend(weights);
    }
    for f in &wanted {
        let path = get(f)?;
        snapshot.get_or_insert_with(|| path.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    snapshot.ok_or_else(|| fail("download", &"nothing was downloaded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system's temp dir, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new() -> Self {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("remask-hub-test-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn hub_ids_are_org_slash_name_with_an_optional_revision() {
        let id = |s| HubId::parse(s);
        assert_eq!(
            id("GSAI-ML/LLaDA-8B-Instruct"),
            Some(HubId {
                repo: "GSAI-ML/LLaDA-8B-Instruct".into(),
                revision: None
            })
        );
        assert_eq!(
            id("org/name@v1.0").and_then(|i| i.revision),
            Some("v1.0".to_string())
        );
        assert_eq!(id("org/name@refs/pr/1").unwrap().repo, "org/name");
        for not in [
            "name",
            "/abs/path",
            "a/b/c",
            "./x",
            "../x",
            "org/",
            "/name",
            "org/.hidden",
            "org/na me",
            "org/name@",
            "org/name@../x",
            "org/-x",
            "",
        ] {
            assert_eq!(id(not), None, "{not}");
        }
        assert_eq!(
            HubId::parse("o/n").unwrap().folder(),
            "models--o--n".to_string()
        );
    }

    #[test]
    fn cached_snapshots_follow_refs_and_need_a_complete_checkpoint() {
        let cache = TempDir::new();
        let hash = "0123456789abcdef0123456789abcdef01234567";
        let repo = cache.path().join("models--org--name");
        let snap = repo.join("snapshots").join(hash);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), format!("{hash}\n")).unwrap();
        let id = HubId::parse("org/name").unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        std::fs::write(snap.join("tokenizer.json"), "{}").unwrap();
        assert_eq!(cached_snapshot(cache.path(), &id), None, "no weights yet");
        std::fs::write(
            snap.join("model.safetensors.index.json"),
            r#"{"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}"#,
        )
        .unwrap();
        std::fs::write(snap.join("model-1.safetensors"), "").unwrap();
        assert_eq!(cached_snapshot(cache.path(), &id), None, "a shard missing");
        std::fs::write(snap.join("model-2.safetensors"), "").unwrap();
        assert_eq!(cached_snapshot(cache.path(), &id), Some(snap.clone()));
        // by commit hash, without a ref
        let by_hash = HubId::parse(&format!("org/name@{hash}")).unwrap();
        assert_eq!(cached_snapshot(cache.path(), &by_hash), Some(snap));
        // another branch: no ref
        let other = HubId::parse("org/name@dev").unwrap();
        assert_eq!(cached_snapshot(cache.path(), &other), None);
    }
}
