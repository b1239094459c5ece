//! The shipped Prometheus alerting rules (ops/prometheus/nbiot-gateway.rules.yml) checked
//! with the real `promtool` (Debian `prometheus`): the file is valid, its unit tests
//! (ops/prometheus/tests/*.yml) pass, every alert has a test case in which it fires, every
//! alert carries the annotations and label operators rely on, and every metric the rules
//! read is one the gateway exports.

use std::path::{Path, PathBuf};
use std::process::Command;

fn ops() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/prometheus")
}

fn rules_file() -> PathBuf {
    ops().join("nbiot-gateway.rules.yml")
}

fn test_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(ops().join("tests"))
        .expect("ops/prometheus/tests exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no promtool test files");
    files
}

fn promtool(args: &[&str], files: &[PathBuf]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .args(files)
        .output()
        .expect("promtool runs (Debian package prometheus; scripts/test.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// One `- alert:` entry of the rules file, as lines (the file's own layout: two-space YAML,
/// one rule per `- alert:`).
struct Rule {
    name: String,
    text: String,
}

fn rules() -> Vec<Rule> {
    let text = std::fs::read_to_string(rules_file()).expect("read rules");
    let mut rules: Vec<Rule> = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.trim_start().strip_prefix("- alert:") {
            rules.push(Rule {
                name: name.trim().to_owned(),
                text: String::new(),
            });
        } else if let Some(rule) = rules.last_mut() {
            if !line.trim_start().starts_with('#') {
                rule.text.push_str(line);
                rule.text.push('\n');
            }
        }
    }
    rules
}

#[test]
fn rules_file_is_valid() {
    let (ok, out) = promtool(&["check", "rules"], &[rules_file()]);
    assert!(ok, "promtool check rules failed:\n{out}");
    let n = rules().len();
    assert!(
        out.contains(&format!("SUCCESS: {n} rules found")),
        "promtool found a different number of rules than the {n} `- alert:` entries:\n{out}"
    );
}

#[test]
fn promtool_unit_tests_pass() {
    let (ok, out) = promtool(&["test", "rules"], &test_files());
    assert!(ok, "promtool test rules failed:\n{out}");
    assert!(!out.contains("FAILED"), "{out}");
    assert_eq!(
        out.matches("SUCCESS").count(),
        test_files().len(),
        "one SUCCESS per test file:\n{out}"
    );
}

/// Per alert name: (cases where it must fire, cases where it must stay quiet), read from
/// the test files' `alertname:` / `exp_alerts:` pairs (`exp_alerts: []` = quiet).
fn test_cases() -> std::collections::BTreeMap<String, (usize, usize)> {
    let mut cases = std::collections::BTreeMap::<String, (usize, usize)>::new();
    for file in test_files() {
        let text = std::fs::read_to_string(&file).expect("read test file");
        let mut current: Option<String> = None;
        for line in text.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix("alertname:") {
                current = Some(name.trim().to_owned());
            } else if let Some(rest) = line.strip_prefix("exp_alerts:") {
                let name = current
                    .take()
                    .unwrap_or_else(|| panic!("{}: exp_alerts without alertname", file.display()));
                let entry = cases.entry(name).or_default();
                if rest.trim() == "[]" {
                    entry.1 += 1;
                } else {
                    entry.0 += 1;
                }
            }
        }
    }
    cases
}

#[test]
fn every_alert_has_a_firing_test_and_tests_name_real_alerts() {
    let rules = rules();
    let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    assert!(names.len() >= 15, "{names:?}");
    let cases = test_cases();
    for name in &names {
        let (firing, _) = cases.get(*name).copied().unwrap_or_default();
        assert!(
            firing >= 1,
            "alert {name} has no promtool test case in which it fires"
        );
    }
    // promtool accepts a test of an alert that does not exist (it never fires, so
    // `exp_alerts: []` passes): a renamed rule would silently lose its quiet cases.
    for name in cases.keys() {
        assert!(
            names.contains(&name.as_str()),
            "the tests name an alert the rules file does not have: {name}"
        );
    }
}

#[test]
fn every_alert_has_severity_annotations_and_a_runbook() {
    for rule in rules() {
        let t = &rule.text;
        assert!(
            t.contains("severity: critical") || t.contains("severity: warning"),
            "{}: severity must be critical or warning",
            rule.name
        );
        for key in ["summary:", "description:", "runbook:"] {
            assert!(t.contains(key), "{}: no {key} annotation", rule.name);
        }
        assert!(
            rule.name.starts_with("Nbiot"),
            "{}: gateway alerts are named Nbiot… so routes can tell them from device alerts",
            rule.name
        );
    }
}

/// Every `nbiot_…` name a rule reads is a metric the gateway defines in
/// src/telemetry/metrics.rs (a histogram is read through its `_bucket` series).
#[test]
fn rules_read_only_metrics_the_gateway_exports() {
    let source = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src/telemetry/metrics.rs"),
    )
    .expect("read metrics.rs");
    let text = std::fs::read_to_string(rules_file()).expect("read rules");
    let mut checked = 0;
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        // `nbiot_gateway` is the log target a runbook names (RUST_LOG=nbiot_gateway=debug).
        if !word.starts_with("nbiot_") || word == "nbiot_gateway" {
            continue;
        }
        let base = word.strip_suffix("_bucket").unwrap_or(word);
        assert!(
            source.contains(&format!("\"{base}\"")),
            "the rules read {word}, which src/telemetry/metrics.rs does not define"
        );
        checked += 1;
    }
    assert!(checked > 20, "{checked}");
}
