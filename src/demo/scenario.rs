//! The demo's scenarios: the built-in two-cluster demo or a directory, as steps of files, and
//! writing a step into the tracker's clusterset directory.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::DemoError;

/// The built-in scenario: the seed's two-cluster demo (`examples/two-cluster/`), its shared
/// files resolved (steps 2 and 3 link to step 1's).
const TWO_CLUSTER_C1: &str =
    include_str!("../../examples/two-cluster/1-no-policy/cluster-1/demo.yaml");
const TWO_CLUSTER_C2: &str =
    include_str!("../../examples/two-cluster/1-no-policy/cluster-2/demo.yaml");
const TWO_CLUSTER_DENY: &str =
    include_str!("../../examples/two-cluster/2-default-deny/cluster-2/policy.yaml");
const TWO_CLUSTER_ALLOW: &str =
    include_str!("../../examples/two-cluster/3-allow-from-cluster-1/cluster-2/policy.yaml");
const TWO_CLUSTER_PROBES: &str = include_str!("../../examples/two-cluster/probes.yaml");

/// A scenario: steps of manifests, and the probes made at every step.
#[derive(Debug)]
pub(super) struct Scenario {
    pub(super) steps: Vec<Step>,
    pub(super) probes: String,
    /// Where the probes come from, for errors.
    pub(super) probes_file: PathBuf,
}

/// One step: a clusterset's files by path (`CLUSTER/…`).
#[derive(Debug)]
pub struct Step {
    /// Its name (a directory's name, for a scenario read from one).
    pub name: String,
    /// Its files' contents by path below the clusterset directory (`CLUSTER/…`).
    pub files: BTreeMap<PathBuf, Vec<u8>>,
    /// The directory it was read from, loaded as is so that errors name the user's files.
    pub origin: Option<PathBuf>,
}

impl Scenario {
    pub(super) fn built_in() -> Self {
        let file = |path: &str, text: &str| (PathBuf::from(path), text.as_bytes().to_vec());
        let step = |name: &str, files: Vec<(PathBuf, Vec<u8>)>| Step {
            name: name.to_owned(),
            files: files.into_iter().collect(),
            origin: None,
        };
        let c1 = || file("cluster-1/demo.yaml", TWO_CLUSTER_C1);
        let c2 = || file("cluster-2/demo.yaml", TWO_CLUSTER_C2);
        Self {
            steps: vec![
                step("1-no-policy", vec![c1(), c2()]),
                step(
                    "2-default-deny",
                    vec![c1(), c2(), file("cluster-2/policy.yaml", TWO_CLUSTER_DENY)],
                ),
                step(
                    "3-allow-from-cluster-1",
                    vec![c1(), c2(), file("cluster-2/policy.yaml", TWO_CLUSTER_ALLOW)],
                ),
            ],
            probes: TWO_CLUSTER_PROBES.to_owned(),
            probes_file: PathBuf::from("examples/two-cluster/probes.yaml (built in)"),
        }
    }

    /// A clusterset, or a directory of steps (subdirectories whose entries are all
    /// directories: clustersets), with `probes.yaml` in `dir`.
    pub(super) fn from_dir(dir: &Path) -> Result<Self, DemoError> {
        let bad = |message: String| DemoError::Scenario {
            dir: dir.to_owned(),
            message,
        };
        let probes_file = dir.join("probes.yaml");
        let probes = std::fs::read_to_string(&probes_file)
            .map_err(|e| bad(format!("probes.yaml: {e} (the probes of every step)")))?;
        let subdirs = visible_dirs(dir).map_err(|e| bad(e.to_string()))?;
        let mut is_steps = !subdirs.is_empty();
        for sub in &subdirs {
            let entries = visible_entries(sub).map_err(|e| bad(e.to_string()))?;
            is_steps &= !entries.is_empty() && entries.iter().all(|e| e.is_dir());
        }
        let step_dirs = if is_steps {
            subdirs
        } else {
            vec![dir.to_owned()]
        };
        let mut steps = Vec::new();
        for step_dir in step_dirs {
            let mut files = BTreeMap::new();
            for cluster in visible_dirs(&step_dir).map_err(|e| bad(e.to_string()))? {
                collect_files(&cluster, &step_dir, &mut files, 0)
                    .map_err(|e| bad(e.to_string()))?;
            }
            steps.push(Step {
                name: step_dir.file_name().map_or_else(
                    || step_dir.display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                ),
                files,
                origin: Some(step_dir),
            });
        }
        Ok(Self {
            steps,
            probes,
            probes_file,
        })
    }
}

/// The entries of `dir` not starting with a dot, sorted.
fn visible_entries(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_name().to_string_lossy().starts_with('.') {
            entries.push(entry.path());
        }
    }
    entries.sort();
    Ok(entries)
}

/// The visible subdirectories of `dir` (following symbolic links), sorted.
fn visible_dirs(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    Ok(visible_entries(dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .collect())
}

/// Reads every visible file under `dir` into `files`, keyed by its path below `base`.
fn collect_files(
    dir: &Path,
    base: &Path,
    files: &mut BTreeMap<PathBuf, Vec<u8>>,
    depth: usize,
) -> std::io::Result<()> {
    // Symbolic links are followed (the seed's steps share files that way): bound the depth
    // so that a link loop ends.
    if depth > 16 {
        return Err(std::io::Error::other(format!(
            "{}: nested too deep (a symbolic link loop?)",
            dir.display()
        )));
    }
    for path in visible_entries(dir)? {
        if path.is_dir() {
            collect_files(&path, base, files, depth + 1)?;
        } else {
            let contents = std::fs::read(&path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            let relative = path.strip_prefix(base).unwrap_or(&path).to_owned();
            files.insert(relative, contents);
        }
    }
    Ok(())
}

/// Makes `dir` hold exactly `step`'s files, given that it holds `previous`'s: changed files
/// are renamed into place (the tracker never reads half a file), others removed.
pub fn write_step(dir: &Path, previous: Option<&Step>, step: &Step) -> Result<(), DemoError> {
    let io = |what: String| move |error| DemoError::Io { what, error };
    let old = previous.map(|p| &p.files);
    for (relative, contents) in &step.files {
        if old.and_then(|o| o.get(relative)) == Some(contents) {
            continue;
        }
        let path = dir.join(relative);
        let parent = path.parent().unwrap_or(dir);
        std::fs::create_dir_all(parent).map_err(io(format!("{}", parent.display())))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Hidden, so the tracker's loader skips it until it is renamed.
        let staging = parent.join(format!(".{name}.weft-demo"));
        std::fs::write(&staging, contents).map_err(io(format!("{}", staging.display())))?;
        std::fs::rename(&staging, &path).map_err(io(format!("{}", path.display())))?;
    }
    for relative in old.into_iter().flat_map(|o| o.keys()) {
        if !step.files.contains_key(relative) {
            let path = dir.join(relative);
            std::fs::remove_file(&path).map_err(io(format!("{}", path.display())))?;
        }
    }
    // A cluster the step no longer has leaves the view with its directory.
    let clusters: BTreeSet<_> = step.files.keys().filter_map(|p| p.iter().next()).collect();
    let entries = visible_dirs(dir).map_err(io(format!("{}", dir.display())))?;
    for cluster in entries {
        if cluster
            .file_name()
            .is_some_and(|name| !clusters.contains(name))
        {
            std::fs::remove_dir_all(&cluster).map_err(io(format!("{}", cluster.display())))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_scenario_is_the_examples_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/two-cluster");
        let from_dir = Scenario::from_dir(&dir).expect("the example is a scenario");
        let built_in = Scenario::built_in();
        assert_eq!(from_dir.probes, built_in.probes);
        let names = |s: &Scenario| s.steps.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&from_dir), names(&built_in));
        for (a, b) in from_dir.steps.iter().zip(&built_in.steps) {
            assert_eq!(a.files, b.files, "step {}", a.name);
        }
        // One step given as a clusterset.
        let one = Scenario::from_dir(&dir.join("1-no-policy"));
        assert!(
            one.as_ref()
                .is_err_and(|e| e.to_string().contains("probes.yaml")),
            "a clusterset needs its probes beside it: {one:?}"
        );
    }

    #[test]
    fn steps_replace_each_other_in_the_trackers_directory() {
        let out = tempfile::tempdir().expect("tempdir");
        let scenario = Scenario::built_in();
        let [one, two, three] = &scenario.steps[..] else {
            panic!("three steps");
        };
        let dir = out.path();
        write_step(dir, None, one).expect("step 1");
        assert!(!dir.join("cluster-2/policy.yaml").exists());
        write_step(dir, Some(one), two).expect("step 2");
        let policy = std::fs::read_to_string(dir.join("cluster-2/policy.yaml")).expect("read");
        assert_eq!(policy, TWO_CLUSTER_DENY);
        write_step(dir, Some(two), three).expect("step 3");
        let policy = std::fs::read_to_string(dir.join("cluster-2/policy.yaml")).expect("read");
        assert_eq!(policy, TWO_CLUSTER_ALLOW);
        write_step(dir, Some(three), one).expect("back to step 1");
        assert!(!dir.join("cluster-2/policy.yaml").exists());
        let only_c1 = Step {
            name: "c1".into(),
            files: one
                .files
                .iter()
                .filter(|(p, _)| p.starts_with("cluster-1"))
                .map(|(p, c)| (p.clone(), c.clone()))
                .collect(),
            origin: None,
        };
        write_step(dir, Some(one), &only_c1).expect("cluster-2 leaves");
        assert!(!dir.join("cluster-2").exists());
        let hidden: Vec<_> = visible_entries(&dir.join("cluster-1")).expect("ls");
        assert_eq!(
            hidden,
            [dir.join("cluster-1/demo.yaml")],
            "no staging file left"
        );
    }
}
