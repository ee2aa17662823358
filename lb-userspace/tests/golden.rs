//! Golden tests: realistic manifests in, the canonical model dump and warnings out, compared with
//! the checked-in `.dump` file beside each `.yaml`. `UPDATE_GOLDEN=1 cargo test --test golden`
//! rewrites the dumps; review the diff like a table.
use std::path::{Path, PathBuf};

use lb_userspace::{model, sources::manifests};

fn render(yaml_path: &Path) -> String {
    let text = std::fs::read_to_string(yaml_path).unwrap();
    let (mut objects, mut doc_warnings) = (Default::default(), Vec::new());
    manifests::parse_into(yaml_path, &text, &mut objects, &mut doc_warnings);
    assert!(doc_warnings.is_empty(), "{doc_warnings:?}");
    let config = model::Config {
        node_name: "node-a".into(),
        node_addresses: vec!["198.18.0.2".parse().unwrap(), "fd00:18::2".parse().unwrap()],
        ..Default::default()
    };
    let (m, warnings) = model::build(&objects, &config);
    let mut out = m.to_string();
    out.push_str("# warnings\n");
    for w in warnings {
        out.push_str(&format!("{w}\n"));
    }
    out
}

#[test]
fn golden_manifests_produce_their_recorded_dumps() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut yamls: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    yamls.sort();
    assert!(!yamls.is_empty(), "no golden inputs in {}", dir.display());
    for yaml in yamls {
        let dump_path = yaml.with_extension("dump");
        let got = render(&yaml);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&dump_path, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&dump_path).unwrap_or_else(|_| {
            panic!(
                "{} is missing: run with UPDATE_GOLDEN=1",
                dump_path.display()
            )
        });
        assert_eq!(
            got,
            want,
            "{} changed: compare, and if right, rerun with UPDATE_GOLDEN=1",
            yaml.display()
        );
    }
}
