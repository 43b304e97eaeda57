//! `hatoba-testenv`: starts and stops the local registries, the token
//! server and the fixture images that hatoba's integration tests use.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as ProcessCommand, ExitCode};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use hatoba_testenv::env::{
    self, BASIC_PASSWORD, BASIC_USER, DATA_DIR, ENV_PATH, EnvError, Ports, RUN_DIR, TOKEN_ISSUER,
    TOKEN_PASSWORD, TOKEN_SERVICE, TOKEN_USER, TestEnv,
};
use hatoba_testenv::fixtures::{self, Destinations, catalog, push::Credentials};
use hatoba_testenv::guard;
use hatoba_testenv::registry::{self, Layout, Registry, Stopped};
use hatoba_testenv::token::{self, TokenIssuer, TokenServer};

#[derive(Parser)]
#[command(
    name = "hatoba-testenv",
    about = "Local registries, a token server and fixture images for hatoba's tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the registries and the token server, install the firewall
    /// guard, push the fixtures and write /run/hatoba-testenv/env.json
    /// (when already up, only makes sure the guard is installed)
    Up,
    /// Stop the processes that `up` started, remove the firewall guard and
    /// remove /run/hatoba-testenv
    Down {
        /// Also remove /var/lib/hatoba-testenv: registry storage, keys and archives
        #[arg(long)]
        purge: bool,
    },
    /// Print /run/hatoba-testenv/env.json
    Env,
    /// Exit 0 when an environment from `up` runs and is healthy, 1 otherwise
    Status,
    /// Serve bearer tokens for the token registry (started by `up`)
    #[command(hide = true)]
    TokenServer(TokenServerArgs),
}

#[derive(Args)]
struct TokenServerArgs {
    /// Address to listen on
    #[arg(long)]
    listen: SocketAddr,
    /// PEM private key that signs tokens
    #[arg(long)]
    key: PathBuf,
    /// PEM certificate of the key, sent in each token's x5c header
    #[arg(long)]
    cert: PathBuf,
    /// Issuer written into the `iss` claim
    #[arg(long, default_value = TOKEN_ISSUER)]
    issuer: String,
    /// Service name written into the `aud` claim
    #[arg(long, default_value = TOKEN_SERVICE)]
    service: String,
    /// User name that gets the requested access
    #[arg(long, default_value = TOKEN_USER)]
    user: String,
    /// Password of that user
    #[arg(long, default_value = TOKEN_PASSWORD, hide_default_value = true)]
    password: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("hatoba-testenv: failed to start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up => up().await,
            Command::Down { purge } => down(purge).await,
            Command::Env => print_env(),
            Command::Status => status().await,
            Command::TokenServer(args) => serve_tokens(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hatoba-testenv: {}", describe(&error));
            ExitCode::FAILURE
        }
    }
}

/// Joins an error and its causes with ": ", leaving out causes whose text
/// the message before them already contains (most error messages here
/// embed their source).
fn describe(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn require_root(command: &str) -> anyhow::Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("`hatoba-testenv {command}` must run as root: it manages {RUN_DIR} and {DATA_DIR}");
    }
    Ok(())
}

/// Takes an exclusive lock so that concurrent `up` and `down` runs wait for
/// each other. The lock is released when the file is dropped.
fn lock(layout: &Layout) -> anyhow::Result<File> {
    registry::create_dir(&layout.dir)?;
    let path = layout.lock_path();
    let file = File::create(&path).with_context(|| format!("failed to open {}", path.display()))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .with_context(|| format!("failed to lock {}", path.display()))?;
    Ok(file)
}

async fn up() -> anyhow::Result<()> {
    require_root("up")?;
    let ports = Ports::from_env()?;
    let layout = Layout::new(DATA_DIR);
    let _lock = lock(&layout)?;

    if reuse_running(&ports).await? {
        // An environment from before the guard existed gets it now.
        guard::install()?;
        eprintln!("test environment is already running; see {ENV_PATH}");
        return Ok(());
    }

    let mut started = Vec::new();
    match start_and_publish(&layout, &ports, &mut started).await {
        Ok(env) => {
            eprintln!(
                "test environment is up: open {}, basic {}, token {}, token server {}; {} fixtures; wrote {ENV_PATH}",
                env.open,
                env.basic,
                env.token,
                env.token_server,
                env.fixtures.len()
            );
            Ok(())
        }
        Err(error) => {
            if !started.is_empty() {
                eprintln!("hatoba-testenv: up failed, stopping what it started");
            }
            stop_children(started).await;
            if let Err(guard_error) = guard::remove() {
                eprintln!("hatoba-testenv: {guard_error}");
            }
            let _ = std::fs::remove_dir_all(RUN_DIR);
            Err(error)
        }
    }
}

/// Reports whether an environment from `up` runs on the configured ports
/// with every fixture, without changing anything.
async fn status() -> anyhow::Result<()> {
    let ports = Ports::from_env()?;
    let env = TestEnv::load().context("no test environment is running")?;
    anyhow::ensure!(
        is_healthy(&env, &ports).await,
        "the test environment in {ENV_PATH} is not healthy: a process stopped, it uses other ports or fixtures are missing"
    );
    anyhow::ensure!(
        guard::is_installed(),
        "the test environment is not healthy: the firewall guard chain {} or its jump from FORWARD is missing; run `hatoba-testenv up` as root to add it",
        guard::CHAIN
    );
    println!("test environment is running: open {}", env.open);
    Ok(())
}

/// Checks an environment left by an earlier `up`. Returns true when all of
/// its processes run, respond to HTTP and have every fixture. Otherwise it
/// stops what is left of that environment and returns false.
async fn reuse_running(ports: &Ports) -> anyhow::Result<bool> {
    let env = match TestEnv::load() {
        Ok(env) => env,
        Err(EnvError::NotRunning { .. }) => return Ok(false),
        Err(error) => {
            eprintln!("hatoba-testenv: ignoring unreadable {ENV_PATH}: {error}");
            std::fs::remove_dir_all(RUN_DIR)
                .with_context(|| format!("failed to remove {RUN_DIR}"))?;
            return Ok(false);
        }
    };

    if is_healthy(&env, ports).await {
        return Ok(true);
    }
    eprintln!(
        "hatoba-testenv: restarting the environment in {ENV_PATH}: it uses other ports, a process stopped or fixtures are missing"
    );
    stop_pids(&env.dir, &env.pids).await?;
    std::fs::remove_dir_all(RUN_DIR).with_context(|| format!("failed to remove {RUN_DIR}"))?;
    Ok(false)
}

async fn is_healthy(env: &TestEnv, ports: &Ports) -> bool {
    let same_ports = env.open == ports.open.to_string()
        && env.basic == ports.basic.to_string()
        && env.token == ports.token.to_string()
        && env.token_server == ports.token_server.to_string();
    let processes_run = !env.pids.is_empty()
        && env
            .pids
            .iter()
            .all(|pid| registry::is_alive(*pid) && registry::started_by_testenv(*pid, &env.dir));
    let fixtures_complete = catalog::NAMES
        .iter()
        .all(|name| env.fixtures.contains_key(*name));
    if !(same_ports && processes_run && fixtures_complete) {
        return false;
    }

    let Ok(client) = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(5))
        .build()
    else {
        return false;
    };
    let probes = [
        (format!("http://{}/v2/", env.open), [200, 200]),
        (format!("http://{}/v2/", env.basic), [200, 401]),
        (format!("http://{}/v2/", env.token), [200, 401]),
        (format!("http://{}/token", env.token_server), [200, 200]),
    ];
    for (url, accepted) in probes {
        match client.get(&url).send().await {
            Ok(response) if accepted.contains(&response.status().as_u16()) => {}
            _ => return false,
        }
    }
    true
}

async fn start_and_publish(
    layout: &Layout,
    ports: &Ports,
    started: &mut Vec<Child>,
) -> anyhow::Result<TestEnv> {
    let registries = Registry::all(layout, ports);
    prepare_files(layout, &registries)?;
    for addr in [ports.open, ports.basic, ports.token, ports.token_server] {
        registry::ensure_port_free(addr)?;
    }

    eprintln!("starting the token server and the registries");
    start_processes(layout, ports, &registries, started).await?;

    eprintln!("installing the firewall guard chain {}", guard::CHAIN);
    guard::install()?;

    // Record the PIDs before the long fixture push, so `down` can stop the
    // processes even if this command is killed.
    let mut env = TestEnv {
        open: ports.open.to_string(),
        basic: ports.basic.to_string(),
        token: ports.token.to_string(),
        token_server: ports.token_server.to_string(),
        basic_user: BASIC_USER.to_string(),
        basic_password: BASIC_PASSWORD.to_string(),
        token_user: TOKEN_USER.to_string(),
        token_password: TOKEN_PASSWORD.to_string(),
        dir: layout.dir.clone(),
        pids: started.iter().map(Child::id).collect(),
        archives: env::Archives {
            oci: PathBuf::new(),
            docker: PathBuf::new(),
            oci_reference: String::new(),
            docker_reference: String::new(),
        },
        fixtures: Default::default(),
    };
    env.write_to(Path::new(ENV_PATH))?;

    eprintln!("building the fixtures from {}", fixtures::BUSYBOX_PATH);
    let catalog = tokio::task::spawn_blocking(|| {
        let busybox = fixtures::read_busybox(Path::new(fixtures::BUSYBOX_PATH))?;
        catalog::build(&busybox)
    })
    .await
    .context("fixture build task failed")??;

    eprintln!("pushing the fixtures");
    let [open, basic, token] = &registries;
    let destinations = Destinations {
        open,
        basic,
        token,
        basic_credentials: Credentials {
            user: BASIC_USER.to_string(),
            password: BASIC_PASSWORD.to_string(),
        },
        token_credentials: Credentials {
            user: TOKEN_USER.to_string(),
            password: TOKEN_PASSWORD.to_string(),
        },
    };
    env.fixtures = fixtures::publish(&catalog, &destinations).await?;
    env.archives = fixtures::write_archives(&catalog, &layout.archives_dir(), &env.open)?;
    env.write_to(Path::new(ENV_PATH))?;
    Ok(env)
}

/// Starts the token server and the registries, adding each child to
/// `started` as soon as it runs, then waits until all of them respond.
async fn start_processes(
    layout: &Layout,
    ports: &Ports,
    registries: &[Registry; 3],
    started: &mut Vec<Child>,
) -> anyhow::Result<()> {
    // The token server is this program again, with the hidden subcommand.
    let mut token_server = ProcessCommand::new(
        std::env::current_exe().context("failed to find the hatoba-testenv executable")?,
    );
    token_server
        .arg("token-server")
        .arg("--listen")
        .arg(ports.token_server.to_string())
        .arg("--key")
        .arg(layout.token_key())
        .arg("--cert")
        .arg(layout.token_cert());
    started.push(registry::spawn_detached(
        "token server",
        token_server,
        &layout.token_log(),
    )?);
    for registry in registries {
        started.push(registry.spawn()?);
    }

    let mut children = started.iter_mut();
    if let Some(child) = children.next() {
        let log = layout.token_log();
        let addr = ports.token_server;
        registry::wait_ready("token server", addr, "/token", &[200], child, &log).await?;
    }
    for (registry, child) in registries.iter().zip(children) {
        let name = format!("{} registry", registry.name);
        let log = registry.log_path();
        registry::wait_ready(&name, registry.addr, "/v2/", &[200, 401], child, &log).await?;
    }
    Ok(())
}

/// Creates the directories, configs, the htpasswd file and the token key
/// pair. The key pair is kept across runs.
fn prepare_files(layout: &Layout, registries: &[Registry]) -> anyhow::Result<()> {
    registry::create_dir(&layout.token_dir())?;
    token::ensure_certificate(&layout.token_key(), &layout.token_cert())?;
    for registry in registries {
        registry.prepare()?;
        if let registry::RegistryAuth::Basic { htpasswd } = &registry.auth {
            registry::write_htpasswd(htpasswd, BASIC_USER, BASIC_PASSWORD)?;
        }
    }
    Ok(())
}

/// Stops and reaps processes that this run of `up` started. Errors are
/// printed, since the error that caused the rollback matters more.
async fn stop_children(children: Vec<Child>) {
    for mut child in children {
        if let Err(error) = registry::stop_child(&mut child).await {
            eprintln!("hatoba-testenv: {error}");
        }
    }
}

/// Stops processes recorded in env.json, leaving any PID alone that now
/// belongs to another program.
async fn stop_pids(dir: &Path, pids: &[u32]) -> anyhow::Result<()> {
    let mut failures = Vec::new();
    for pid in pids {
        match registry::stop(*pid, dir).await {
            Ok(Stopped::Stopped) => eprintln!("stopped process {pid}"),
            Ok(Stopped::AlreadyGone) => {}
            Ok(Stopped::NotOurs) => {
                eprintln!("left process {pid} alone: it is not one that `up` started")
            }
            Err(error) => failures.push(error.to_string()),
        }
    }
    if !failures.is_empty() {
        bail!("failed to stop processes: {}", failures.join("; "));
    }
    Ok(())
}

async fn down(purge: bool) -> anyhow::Result<()> {
    require_root("down")?;
    let layout = Layout::new(DATA_DIR);
    // Without a data directory no `up` ran, and locking would create one.
    let _lock = if layout.dir.exists() {
        Some(lock(&layout)?)
    } else {
        None
    };

    let stopped = match TestEnv::load() {
        Ok(env) => stop_pids(&env.dir, &env.pids).await,
        Err(EnvError::NotRunning { .. }) => {
            eprintln!("test environment is not running");
            Ok(())
        }
        Err(error) => {
            eprintln!("hatoba-testenv: cannot read the PIDs to stop: {error}");
            Ok(())
        }
    };
    // Remove the guard even when stopping failed, so `down` leaves no rules behind.
    let guard_removed = guard::remove();
    remove_dir(Path::new(RUN_DIR))?;
    if purge {
        remove_dir(&layout.dir)?;
    }
    stopped?;
    guard_removed?;
    Ok(())
}

fn remove_dir(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error).with_context(|| format!("failed to remove {}", path.display())),
    }
}

fn print_env() -> anyhow::Result<()> {
    let path = Path::new(ENV_PATH);
    // Loading first gives the "not running" hint instead of a bare I/O error.
    TestEnv::load_from(path)?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read {}", path.display()))?;
    print!("{text}");
    Ok(())
}

async fn serve_tokens(args: TokenServerArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let server = TokenServer {
        issuer: TokenIssuer::from_pem_files(&args.key, &args.cert, &args.issuer)?,
        service: args.service,
        user: args.user,
        password: args.password,
    };
    server.run(args.listen).await?;
    Ok(())
}
