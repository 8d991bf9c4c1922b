//! `ferry bench migrate` in a small configuration, so that it cannot rot:
//! every method runs, every case yields a client-observed downtime, and the
//! CSV and SVG outputs are written. (The figures themselves are for notes,
//! never asserted.)

mod common;

use common::*;

#[test]
fn bench_migrate_runs_every_method_and_writes_its_outputs() {
    require_criu();
    let dir = scratch("bench-migrate");
    let csv = dir.path().join("out.csv");
    let svg = dir.path().join("out.svg");
    let cases = ferry([
        "bench", "migrate", "--json", "--sizes", "32", "--dirty", "0,2",
    ])
    .arg("--workdir")
    .arg(dir.path().join("work"))
    .arg("--csv")
    .arg(&csv)
    .arg("--svg")
    .arg(&svg)
    .json();
    let cases = cases.as_array().expect("a list of cases");
    assert_eq!(cases.len(), 8, "2 dirty rates x 4 methods");
    for c in cases {
        assert!(c["error"].is_null(), "case failed: {c}");
        assert!(c["downtime_ms"].as_f64().unwrap() > 0.0, "{c}");
        assert_eq!(c["continued"].as_bool(), Some(true), "{c}");
    }
    let csv = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(csv.lines().count(), 9, "{csv}");
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"), "{svg}");
}
