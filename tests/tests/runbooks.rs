//! Every command in the runbooks (`docs/operations/runbooks/*.md`) that
//! talks to StemeDB — `curl` to the admin port and `stemectl` — runs as
//! written against a live node and succeeds. Only the port and the
//! production WAL and data paths are substituted, and `stemectl` finds the
//! node through STEMEDB_ADDR / STEMEDB_ADMIN_ADDR.

use std::path::{Path, PathBuf};
use std::process::Command;
use stemedb_client::Assertion;
use stemedb_tests::{bin_dir, Node};

/// Shell commands of a markdown file's ```sh blocks, with line
/// continuations joined and comments dropped.
fn shell_commands(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in markdown.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("```") {
            in_block = !in_block && (trimmed == "```sh" || trimmed == "```bash");
            pending.clear();
            continue;
        }
        if !in_block || trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            pending.push_str(head.trim_end());
            pending.push(' ');
            continue;
        }
        pending.push_str(trimmed);
        out.push(std::mem::take(&mut pending));
    }
    out
}

/// `watch -n N 'CMD'` repeats CMD on a terminal until interrupted; the
/// test runs CMD once, which is what each refresh does.
fn once(cmd: &str) -> String {
    let Some(rest) = cmd.strip_prefix("watch ") else {
        return cmd.to_string();
    };
    let mut rest = rest.trim_start();
    while let Some(opt) = rest.strip_prefix('-') {
        // An option and, for -n/-d style flags, its value.
        let mut parts = opt.splitn(3, ' ');
        let flag = parts.next().unwrap_or("");
        rest = if flag == "n" {
            parts.nth(1).unwrap_or("")
        } else {
            opt.split_once(' ').map(|x| x.1).unwrap_or("")
        }
        .trim_start();
    }
    rest.trim_matches('\'').to_string()
}

fn talks_to_stemedb(cmd: &str) -> bool {
    let placeholder = cmd.contains('<') && cmd.contains('>');
    let cmd = once(cmd);
    !placeholder && (cmd.contains("localhost:18180") || cmd.starts_with("stemectl "))
}

fn runbooks() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations/runbooks");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    files.sort();
    files
}

#[test]
fn the_extractor_finds_the_runbook_commands() {
    let cmds = shell_commands(
        "x\n```sh\n# c\ncurl -s http://localhost:18180/metrics | grep x\nstemectl wal status\ncurl -X POST http://localhost:18180/v1/admin/rate-limit \\\n  -d '{}'\n```\n```toml\nstemectl no\n```\n",
    );
    assert_eq!(
        cmds,
        vec![
            "curl -s http://localhost:18180/metrics | grep x",
            "stemectl wal status",
            "curl -X POST http://localhost:18180/v1/admin/rate-limit -d '{}'",
        ]
    );
    assert_eq!(
        once("watch -n 10 'curl -s http://localhost:18180/metrics | grep x'"),
        "curl -s http://localhost:18180/metrics | grep x"
    );
    let slow = std::fs::read_to_string(
        runbooks()
            .into_iter()
            .find(|p| p.ends_with("slow-fsync.md"))
            .unwrap(),
    )
    .unwrap();
    let n = shell_commands(&slow)
        .iter()
        .filter(|c| talks_to_stemedb(c))
        .count();
    assert!(n >= 3, "slow-fsync.md has only {n} StemeDB commands");
}

#[tokio::test]
async fn every_stemedb_command_in_the_runbooks_works_as_written() {
    let mut ran = 0;
    for file in runbooks() {
        let text = std::fs::read_to_string(&file).unwrap();
        let commands: Vec<_> = shell_commands(&text)
            .into_iter()
            .filter(|c| talks_to_stemedb(c))
            .collect();
        if commands.is_empty() {
            continue;
        }
        // A fresh node per runbook, with some writes so every series exists.
        let node = Node::start().await;
        let c = node.client().await;
        for i in 0..20 {
            c.transact(vec![
                Assertion::assert(format!("rb:{i}"), "n", i as i64).source("rb")
            ])
            .await
            .unwrap();
        }
        let path = format!(
            "{}:{}",
            bin_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        for cmd in commands {
            let cmd_here = once(&cmd)
                .replace("18180", &node.admin_port.to_string())
                .replace(
                    "/var/lib/stemedb/wal",
                    &node.wal_dir().display().to_string(),
                )
                .replace(
                    "/var/lib/stemedb/data",
                    &node.data_dir().display().to_string(),
                );
            let out = Command::new("bash")
                .arg("-c")
                .arg(format!("set -o pipefail; {cmd_here}"))
                .env("PATH", &path)
                .env("STEMEDB_ADDR", node.grpc_url())
                .env("STEMEDB_ADMIN_ADDR", node.admin_url())
                .output()
                .unwrap();
            assert!(
                out.status.success() && !out.stdout.is_empty(),
                "{}: `{cmd}` failed ({}):\nstdout: {}\nstderr: {}",
                file.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            ran += 1;
        }
    }
    assert!(ran >= 10, "only {ran} runbook commands ran");
    eprintln!("ran {ran} runbook commands");
}
