//! The command line as a user runs it: the real binary, real files, exit codes and output.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nbiot-gateway"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("the binary runs")
}

fn run_stdin(args: &[&str], input: &[u8]) -> Output {
    let mut child = bin()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write stdin");
    child.wait_with_output().expect("the binary exits")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

fn shipped_profiles() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("device-profiles")
}

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("nbiot-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const CJT188_REPLY: &str = "68104433221100337881161f9000007766552c007766552c3101221105152021841316";

#[test]
fn decode_with_a_builtin_codec_prints_readings_json() {
    let v = json(&run(&["decode", "--codec", "cjt188", CJT188_REPLY]));
    let r = &v[0];
    assert_eq!(r["measurement"], "water_meter");
    assert_eq!(r["time"], "2015-05-11T22:01:31");
    assert_eq!(r["fields"]["volume_m3"], 556677.0);
    assert_eq!(r["fields"]["status"], 0x8421);
}

#[test]
fn decode_error_is_one_line_and_exit_1() {
    let bad_checksum =
        "fefefefe68104433221100337881161f9000007766552c007766552c3101221105152021840816";
    let out = run(&["decode", "--codec", "cjt188", bad_checksum]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).expect("utf-8");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("checksum mismatch: frame says 0x08, bytes sum to 0x13"),
        "{err}"
    );

    let out = run(&["decode", "--codec", "nope", "00"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown codec `nope`"));

    let out = run(&["decode", "--codec", "cjt188", "6g"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not hex"));
}

#[test]
fn decode_reads_raw_or_hex_from_stdin() {
    let raw: Vec<u8> = (0..CJT188_REPLY.len() / 2)
        .map(|i| u8::from_str_radix(&CJT188_REPLY[2 * i..2 * i + 2], 16).expect("hex"))
        .collect();
    let from_raw = json(&run_stdin(&["decode", "--codec", "cjt188", "-"], &raw));
    let from_hex = json(&run_stdin(
        &["decode", "--codec", "cjt188", "-"],
        format!("{CJT188_REPLY}\n").as_bytes(),
    ));
    assert_eq!(from_raw, from_hex);
    assert_eq!(from_raw[0]["fields"]["volume_m3"], 556677.0);
}

#[test]
fn decode_with_a_profile_uses_its_measurement() {
    let dir = shipped_profiles();
    let v = json(&run(&[
        "decode",
        "--profile",
        "cjt188-water-meter",
        "--profiles",
        dir.to_str().expect("utf-8 path"),
        CJT188_REPLY,
    ]));
    assert_eq!(v[0]["measurement"], "water_meter");

    let out = run(&[
        "decode",
        "--profile",
        "no-such",
        "--profiles",
        dir.to_str().expect("path"),
        "00",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no profile `no-such`") && err.contains("cjt188-water-meter"),
        "{err}"
    );
}

#[test]
fn shipped_profiles_all_pass_check() {
    let out = run(&[
        "profiles",
        "check",
        shipped_profiles().to_str().expect("path"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stderr: {}\nstdout: {stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("0 file(s) with errors"), "{stdout}");
}

#[test]
fn profiles_check_names_file_and_line_of_every_problem() {
    let dir = TempDir::new("check");
    let good = std::fs::read_to_string(shipped_profiles().join("cjt188-water-meter.toml"))
        .expect("shipped profile");
    std::fs::write(dir.0.join("good.toml"), &good).expect("write");
    let cases: &[(&str, &str, &str)] = &[
        (
            "unknown-key.toml",
            "name = \"a\"\nmeasurement = \"m\"\ncodec = \"cjt188\"\nreport_intervall = \"1h\"\n",
            ":4:1: unknown field `report_intervall`",
        ),
        (
            "unknown-codec.toml",
            "name = \"b\"\nmeasurement = \"m\"\ncodec = \"cjt189\"\n",
            ":3:9: unknown codec `cjt189`",
        ),
        (
            "bad-duration.toml",
            "name = \"c\"\nmeasurement = \"m\"\ncodec = \"cjt188\"\nreport_interval = \"often\"\n",
            ":4:19: report_interval `often` is not a duration",
        ),
        (
            "unknown-field.toml",
            "name = \"d\"\nmeasurement = \"m\"\ncodec = \"cjt188\"\n\n[[alerts]]\nname = \"x\"\nexpr = \"volume_m4 > 1\"\nseverity = \"info\"\n",
            ":7:9: alert `x` references field `volume_m4`, which codec `cjt188` never produces (did you mean `volume_m3`?)",
        ),
        (
            "wrong-example.toml",
            &format!(
                "name = \"e\"\nmeasurement = \"m\"\ncodec = \"cjt188\"\n\n[[examples]]\nhex = \"{CJT188_REPLY}\"\nfields = {{ volume_m3 = 1.5 }}\n"
            ),
            ":5:1: example 1, reading 0: field `volume_m3` is 556677.0, expected 1.5",
        ),
        (
            "wrong-error.toml",
            &format!("name = \"f\"\nmeasurement = \"m\"\ncodec = \"cjt188\"\n\n[[examples]]\nhex = \"{CJT188_REPLY}\"\nerror = \"checksum\"\n"),
            ":5:1: example 1: must fail with `checksum` but decoded to 1 reading(s)",
        ),
        (
            "wrong-identity.toml",
            &format!(
                "name = \"g\"\nmeasurement = \"m\"\ncodec = \"cjt188\"\n\n[[examples]]\nhex = \"{CJT188_REPLY}\"\nidentity = {{ device_id = \"1\" }}\nabsent = [\"status\"]\n"
            ),
            ":5:1: example 1, reading 0: identity device_id is 78330011223344, expected 1",
        ),
        (
            "undeclared-field.toml",
            "name = \"h\"\nmeasurement = \"m\"\ncodec = \"cjt188\"\n\n[fields.volume_l]\nunit = \"L\"\n",
            ":5:1: [fields.volume_l] describes a field codec `cjt188` never produces",
        ),
    ];
    for (file, text, _) in cases {
        std::fs::write(dir.0.join(file), text).expect("write");
    }
    let out = run(&["profiles", "check", dir.0.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for (file, _, want) in cases {
        let path = dir.0.join(file);
        let expected = format!("{}{want}", path.display());
        assert!(
            stderr.lines().any(|l| l.starts_with(&expected)),
            "no line `{expected}` in:\n{stderr}"
        );
    }
    // Both problems of one file are reported, not just the first.
    assert!(stderr.contains(
        "wrong-identity.toml:5:1: example 1, reading 0: field `status` must be absent but is 33825"
    ));
    // The good profile still loads next to the broken ones.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("1 profile(s) valid"), "{stdout}");
    assert!(stdout.contains("8 file(s) with errors"), "{stdout}");
}

#[test]
fn print_config_is_the_parseable_default() {
    let out = run(&["print-config"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let parsed = nbiot_gateway::config::Config::parse(Path::new("print-config"), &text, |_| None)
        .expect("parses");
    assert_eq!(parsed, nbiot_gateway::config::Config::default());
    // Every section of the design's config is documented, the optional ones commented out.
    for section in [
        "[coap]",
        "[mqtt]",
        "[http]",
        "[store]",
        "# [influxdb]",
        "# [alertmanager]",
        "[profiles]",
    ] {
        assert!(text.contains(section), "print-config lacks {section}");
    }
}
