//! Running CNI plugin binaries as child processes.
//!
//! [`ProcessRunner`] is the real [`PluginRunner`]: it gives each plugin a
//! cleared environment, feeds its config on stdin, collects bounded output
//! and kills the plugin, with the processes it started in its process
//! group, when it overruns its timeout.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process_group};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin};

use crate::invoke::{PluginError, PluginRunner};

/// Maximum stdout bytes kept from one plugin run. A CNI result is usually a
/// few KiB (an estimate), so more than 1 MiB means a runaway plugin. The
/// excess is read and dropped, so the plugin never blocks on a full pipe, and
/// a successful run past the limit fails with `OutputTooLarge`.
pub const STDOUT_LIMIT: usize = 1024 * 1024;

/// Maximum stderr bytes kept from one plugin run. The last bytes are kept,
/// because a plugin usually prints the reason for a failure just before exiting.
pub const STDERR_LIMIT: usize = 8 * 1024;

/// Directories searched after the plugin's own and the CNI bin dirs, because
/// plugins such as bridge and portmap run iptables and other system tools.
const SYSTEM_PATH: &[&str] = &["/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/// Runs each plugin as a child process in its own process group.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessRunner;

impl PluginRunner for ProcessRunner {
    async fn run(
        &self,
        binary: &Path,
        env: &[(String, String)],
        stdin: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, PluginError> {
        let mut child = tokio::process::Command::new(binary)
            .env_clear()
            .envs(env.iter().map(|(key, value)| (key, value)))
            .env("PATH", search_path(binary, env))
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group lets a timeout kill the tools it started too.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| PluginError::Spawn {
                binary: binary.into(),
                source,
            })?;

        match tokio::time::timeout(timeout, exchange(&mut child, binary, stdin)).await {
            Ok(outcome) => outcome,
            Err(_elapsed) => {
                stop(&mut child, binary).await?;
                Err(PluginError::Timeout {
                    binary: binary.into(),
                    timeout,
                })
            }
        }
    }
}

/// Returns the plugin's PATH: its own directory, the `CNI_PATH` entries,
/// then the system directories, each once. A `PATH` in `env` is replaced.
fn search_path(binary: &Path, env: &[(String, String)]) -> OsString {
    let mut dirs: Vec<&OsStr> = Vec::new();
    if let Some(own) = binary.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        dirs.push(own.as_os_str());
    }
    let cni_path = env
        .iter()
        .filter(|(key, _)| key == "CNI_PATH")
        .flat_map(|(_, value)| value.split(':'));
    let candidates = cni_path.chain(SYSTEM_PATH.iter().copied());
    for dir in candidates.filter(|dir| !dir.is_empty()) {
        let dir = OsStr::new(dir);
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    let joined: Vec<&[u8]> = dirs.iter().map(|dir| dir.as_bytes()).collect();
    OsStr::from_bytes(&joined.join(&b':')).to_os_string()
}

/// Feeds stdin while reading stdout and stderr, then waits for the exit.
/// The leader stays unreaped until the pipes close, so a timeout can still
/// address its process group.
async fn exchange(
    child: &mut Child,
    binary: &Path,
    input: Vec<u8>,
) -> Result<Vec<u8>, PluginError> {
    let (written, stdout, stderr) = tokio::join!(
        write_input(child.stdin.take(), input),
        read_head(child.stdout.take(), STDOUT_LIMIT),
        read_tail(child.stderr.take(), STDERR_LIMIT),
    );
    let status = child.wait().await.map_err(|source| PluginError::Wait {
        binary: binary.into(),
        source,
    })?;
    let read_error = |stream, source| PluginError::ReadOutput {
        binary: binary.into(),
        stream,
        source,
    };
    let stdout = stdout.map_err(|source| read_error("stdout", source))?;
    let stderr = stderr.map_err(|source| read_error("stderr", source))?;

    if !status.success() {
        return Err(PluginError::Exited {
            binary: binary.into(),
            status: status.to_string(),
            stdout: stdout.bytes,
            stderr: stderr.text(),
        });
    }
    written.map_err(|source| PluginError::WriteStdin {
        binary: binary.into(),
        source,
    })?;
    if stdout.truncated {
        return Err(PluginError::OutputTooLarge {
            binary: binary.into(),
            limit: STDOUT_LIMIT,
        });
    }
    Ok(stdout.bytes)
}

/// Writes the whole input, then closes the pipe so the plugin reads end of file.
async fn write_input(stdin: Option<ChildStdin>, input: Vec<u8>) -> io::Result<()> {
    let Some(mut stdin) = stdin else {
        return Ok(());
    };
    match stdin.write_all(&input).await {
        // A plugin may exit without reading its config. Its exit status and
        // output then report the failure.
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        outcome => outcome,
    }
}

/// Output kept from one stream, and whether some of it was dropped.
#[derive(Debug, Default)]
struct Captured {
    bytes: Vec<u8>,
    truncated: bool,
}

impl Captured {
    /// Returns the bytes as trimmed text, marking dropped output with "...".
    fn text(&self) -> String {
        let text = String::from_utf8_lossy(&self.bytes);
        let text = text.trim();
        if self.truncated {
            format!("...{text}")
        } else {
            text.to_owned()
        }
    }
}

/// Reads to EOF, keeping the first `limit` bytes.
async fn read_head<R: AsyncRead + Unpin>(reader: Option<R>, limit: usize) -> io::Result<Captured> {
    let mut captured = Captured::default();
    let Some(mut reader) = reader else {
        return Ok(captured);
    };
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = reader.read(&mut buffer).await?;
        if read == 0 {
            return Ok(captured);
        }
        let room = limit - captured.bytes.len();
        let kept = read.min(room);
        captured.bytes.extend_from_slice(&buffer[..kept]);
        captured.truncated |= kept < read;
    }
}

/// Reads to EOF, keeping the last `limit` bytes.
async fn read_tail<R: AsyncRead + Unpin>(reader: Option<R>, limit: usize) -> io::Result<Captured> {
    let mut captured = Captured::default();
    let Some(mut reader) = reader else {
        return Ok(captured);
    };
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = reader.read(&mut buffer).await?;
        if read == 0 {
            return Ok(captured);
        }
        captured.bytes.extend_from_slice(&buffer[..read]);
        if captured.bytes.len() > limit {
            let excess = captured.bytes.len() - limit;
            captured.bytes.drain(..excess);
            captured.truncated = true;
        }
    }
}

/// Kills the plugin's process group and reaps the plugin.
async fn stop(child: &mut Child, binary: &Path) -> Result<(), PluginError> {
    // The leader is unreaped here, so its pid still names our group.
    let group = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(Pid::from_raw);
    if let Some(group) = group {
        // Best effort for the plugin's own children: the leader itself is
        // killed and reaped below whatever this returns.
        let _ = kill_process_group(group, Signal::KILL);
    }
    child.kill().await.map_err(|source| PluginError::Kill {
        binary: binary.into(),
        source,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::{BTreeMap, HashSet};
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    use serde_json::{Value, json};
    use tokio::sync::RwLock;

    use super::*;
    use crate::config::NetworkConfigList;
    use crate::invoke::{self, Attachment, InvokeError, ListCall, PodIdentity};
    use crate::result;

    /// Writing a script while another test forks leaks the write descriptor
    /// into that child until it execs, and exec of the script then fails
    /// with ETXTBSY. Writers take this lock exclusively; runs, and tests of
    /// other modules that start processes, take it shared.
    pub(crate) static SCRIPTS: RwLock<()> = RwLock::const_new(());

    const TIMEOUT: Duration = Duration::from_secs(30);

    async fn write_plugin(dir: &Path, name: &str, body: &str) -> PathBuf {
        let _exclusive = SCRIPTS.write().await;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).expect("write plugin");
        let mode = std::fs::Permissions::from_mode(0o755);
        std::fs::set_permissions(&path, mode).expect("chmod plugin");
        path
    }

    async fn run(
        binary: &Path,
        env: &[(String, String)],
        stdin: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, PluginError> {
        let _shared = SCRIPTS.read().await;
        ProcessRunner.run(binary, env, stdin, timeout).await
    }

    fn cni_env(command: &str, cni_path: &str) -> Vec<(String, String)> {
        vec![
            ("CNI_COMMAND".into(), command.into()),
            ("CNI_CONTAINERID".into(), "sb1".into()),
            ("CNI_NETNS".into(), "/run/hatoba/netns/sb1".into()),
            ("CNI_IFNAME".into(), "eth0".into()),
            ("CNI_PATH".into(), cni_path.into()),
        ]
    }

    /// Returns true once `pid` is reaped or at least dead (a zombie).
    fn is_dead(pid: &str) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            // The state follows the parenthesised command name.
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        }
    }

    #[tokio::test]
    async fn echo_plugin_gets_stdin_and_env() {
        let dir = tempfile::tempdir().expect("tempdir");
        let env_file = dir.path().join("env");
        let body = format!(
            "tr '\\0' '\\n' < /proc/$$/environ > '{}'\n\
             input=$(cat)\n\
             printf '{{\"command\":\"%s\",\"config\":%s}}' \"$CNI_COMMAND\" \"$input\"\n",
            env_file.display()
        );
        let plugin = write_plugin(dir.path(), "echo", &body).await;
        let bin = dir.path().display().to_string();
        let env = cni_env("ADD", &format!("{bin}:/nonexistent/cni"));
        let config = json!({"cniVersion": "1.0.0", "name": "net", "type": "echo"});

        let stdout = run(
            &plugin,
            &env,
            serde_json::to_vec(&config).expect("encode"),
            TIMEOUT,
        )
        .await
        .expect("plugin succeeds");

        let output: Value = serde_json::from_slice(&stdout).expect("json output");
        assert_eq!(output, json!({"command": "ADD", "config": config}));
        let seen: BTreeMap<String, String> = std::fs::read_to_string(&env_file)
            .expect("env file")
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(key, value)| (key.into(), value.into()))
            .collect();
        let mut expected: BTreeMap<String, String> = env.into_iter().collect();
        expected.insert(
            "PATH".into(),
            format!("{bin}:/nonexistent/cni:/usr/sbin:/usr/bin:/sbin:/bin"),
        );
        assert_eq!(seen, expected);
        // Rust 2024 makes set_var unsafe, so instead of a marker variable
        // the test checks that variables of this process do exist to leak.
        let own: HashSet<String> = std::env::vars().map(|(key, _)| key).collect();
        assert!(
            own.iter().any(|key| !expected.contains_key(key)),
            "the test process has no variable that could leak"
        );
    }

    #[tokio::test]
    async fn failing_plugin_reports_cni_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let body = "cat > /dev/null\n\
                    printf '{\"cniVersion\":\"1.0.0\",\"code\":7,\"msg\":\"no addresses left\"}'\n\
                    echo 'ipam: range 10.88.0.0/16 exhausted' >&2\n\
                    exit 1\n";
        let plugin = write_plugin(dir.path(), "bridge", body).await;

        let error = run(&plugin, &cni_env("ADD", ""), b"{}".to_vec(), TIMEOUT)
            .await
            .expect_err("plugin fails");

        let PluginError::Exited {
            status,
            stdout,
            stderr,
            ..
        } = error
        else {
            panic!("expected an exit failure, got {error}");
        };
        assert_eq!(status, "exit status: 1");
        assert_eq!(stderr, "ipam: range 10.88.0.0/16 exhausted");
        let cni = result::parse_error("bridge", &stdout).expect("CNI error on stdout");
        assert_eq!((cni.code, cni.msg.as_str()), (7, "no addresses left"));
    }

    #[tokio::test]
    async fn add_list_reports_printed_cni_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let body = "cat > /dev/null\n\
                    printf '{\"cniVersion\":\"1.0.0\",\"code\":11,\"msg\":\"try again\"}'\n\
                    exit 1\n";
        write_plugin(dir.path(), "bridge", body).await;
        let value = json!({"name": "net", "cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]});
        let list = NetworkConfigList::from_value(value, Path::new("/test")).expect("list");
        let attachment = Attachment {
            pod: PodIdentity {
                namespace: "default".into(),
                name: "web".into(),
                uid: "uid-1".into(),
                sandbox_id: "sb1".into(),
            },
            netns: "/run/hatoba/netns/sb1".into(),
            ifname: "eth0".into(),
            port_mappings: Vec::new(),
            dns: None,
        };
        let bin_dirs = vec![dir.path().to_path_buf()];
        let call = ListCall {
            list: &list,
            attachment: &attachment,
            bin_dirs: &bin_dirs,
            timeout: TIMEOUT,
        };

        let _shared = SCRIPTS.read().await;
        let error = invoke::add_list(&ProcessRunner, &call)
            .await
            .expect_err("plugin fails");

        let InvokeError::Plugin { source, .. } = error else {
            panic!("expected a CNI error, got {error}");
        };
        assert_eq!((source.code, source.msg.as_str()), (11, "try again"));
    }

    #[tokio::test]
    async fn timeout_kills_plugin_and_children() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pids = dir.path().join("pids");
        let body = format!(
            "sleep 300 &\n\
             echo \"$$ $!\" > '{}'\n\
             wait\n",
            pids.display()
        );
        let plugin = write_plugin(dir.path(), "stuck", &body).await;
        let limit = Duration::from_secs(3);

        let error = run(&plugin, &cni_env("ADD", ""), b"{}".to_vec(), limit)
            .await
            .expect_err("plugin overruns");

        assert!(
            matches!(&error, PluginError::Timeout { timeout, .. } if *timeout == limit),
            "{error}"
        );
        let message = error.to_string();
        assert!(message.contains("stuck"), "{message}");
        assert!(message.contains("3s"), "{message}");
        let pids = std::fs::read_to_string(&pids).expect("plugin wrote its pids before the limit");
        let (plugin_pid, sleep_pid) = pids.trim().split_once(' ').expect("two pids");
        // The runner reaped the plugin before returning: no zombie is left.
        assert!(
            !Path::new("/proc").join(plugin_pid).exists(),
            "plugin {plugin_pid} still exists"
        );
        // The orphaned sleep is reaped by init, which the test does not
        // control, so only wait for it to be dead.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !is_dead(sleep_pid) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(is_dead(sleep_pid), "child {sleep_pid} survived the timeout");
    }

    #[tokio::test]
    async fn failing_plugin_output_is_truncated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let body = format!(
            "head -c {out} /dev/zero | tr '\\0' o\n\
             head -c {err} /dev/zero | tr '\\0' e >&2\n\
             exit 3\n",
            out = 2 * STDOUT_LIMIT,
            err = 4 * STDERR_LIMIT,
        );
        let plugin = write_plugin(dir.path(), "flood", &body).await;

        let error = run(&plugin, &cni_env("ADD", ""), b"{}".to_vec(), TIMEOUT)
            .await
            .expect_err("plugin fails");

        let PluginError::Exited { stdout, stderr, .. } = error else {
            panic!("expected an exit failure, got {error}");
        };
        assert_eq!(stdout.len(), STDOUT_LIMIT);
        assert!(stdout.iter().all(|byte| *byte == b'o'));
        assert_eq!(stderr.len(), "...".len() + STDERR_LIMIT);
        assert!(stderr.starts_with("...e"), "{}", &stderr[..10]);
    }

    #[tokio::test]
    async fn oversized_successful_output_is_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let body = format!("head -c {} /dev/zero\n", STDOUT_LIMIT + 1);
        let plugin = write_plugin(dir.path(), "flood", &body).await;

        let error = run(&plugin, &cni_env("ADD", ""), b"{}".to_vec(), TIMEOUT)
            .await
            .expect_err("too much output");

        assert!(
            matches!(error, PluginError::OutputTooLarge { limit, .. } if limit == STDOUT_LIMIT),
            "{error}"
        );
    }

    #[tokio::test]
    async fn plugin_writes_before_reading_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Both sizes exceed a pipe buffer: a runner that writes all of stdin
        // before reading stdout would deadlock here.
        let body = "head -c 300000 /dev/zero\ncat > /dev/null\n";
        let plugin = write_plugin(dir.path(), "chatty", body).await;

        let stdout = run(&plugin, &cni_env("ADD", ""), vec![b' '; 300_000], TIMEOUT)
            .await
            .expect("plugin succeeds");

        assert_eq!(stdout.len(), 300_000);
    }

    #[tokio::test]
    async fn plugin_ignoring_input_succeeds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plugin = write_plugin(dir.path(), "deaf", "printf '{}'\n").await;

        let stdout = run(&plugin, &cni_env("DEL", ""), vec![b' '; 1_000_000], TIMEOUT)
            .await
            .expect("plugin succeeds");

        assert_eq!(stdout, b"{}");
    }

    #[tokio::test]
    async fn missing_binary_is_spawn_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("macvlan");

        let error = run(&missing, &cni_env("ADD", ""), b"{}".to_vec(), TIMEOUT)
            .await
            .expect_err("no binary");

        assert!(matches!(error, PluginError::Spawn { .. }), "{error}");
        assert!(error.to_string().contains("macvlan"), "{error}");
    }

    #[test]
    fn search_path_orders_and_dedupes_dirs() {
        let env = cni_env("ADD", "/opt/cni/bin::/usr/lib/cni:/usr/bin");

        let path = search_path(Path::new("/usr/lib/cni/bridge"), &env);

        assert_eq!(
            path,
            "/usr/lib/cni:/opt/cni/bin:/usr/bin:/usr/sbin:/sbin:/bin"
        );
    }
}
