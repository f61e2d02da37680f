//! The `sensorwire` command: parses the command line, then calls the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sensorwire::auth::{Role, UserClaims, jwt::now_secs};
use sensorwire::config::{DbArgs, JwtArgs, LogFormat, ServeArgs};
use sensorwire::store::Store;
use sensorwire::wire::KeyScope;
use sensorwire::{Config, redact};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "sensorwire",
    version,
    about = "Real-time gateway for sensor dashboards"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gateway (the default).
    Serve(ServeArgs),
    /// Serve with a demo organisation and a device simulator, and print the dashboard URL.
    Demo(ServeArgs),
    /// Apply database migrations and exit.
    Migrate(DbArgs),
    /// Mint a development JWT (HS256 with JWT_SECRET, or the development secret).
    Token(TokenArgs),
    /// Manage device API keys.
    Apikey {
        #[command(subcommand)]
        command: ApikeyCommand,
    },
    /// Write the generated contract files (TypeScript, JSON Schema, OpenAPI) into a directory.
    Proto {
        /// Target directory.
        #[arg(default_value = "proto")]
        dir: std::path::PathBuf,
    },
}

#[derive(clap::Args)]
struct TokenArgs {
    /// User id (`sub`).
    #[arg(long, default_value = "dev-user")]
    sub: String,
    /// Organisation (`org_id`).
    #[arg(long)]
    org: String,
    /// viewer, operator or admin.
    #[arg(long, default_value = "admin")]
    role: String,
    /// Restrict to these sites (repeatable).
    #[arg(long = "site")]
    sites: Vec<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: i64,
    #[command(flatten)]
    jwt: JwtArgs,
}

#[derive(Subcommand)]
enum ApikeyCommand {
    /// Create a key and print it (shown once).
    Create {
        #[arg(long)]
        org: String,
        #[arg(long)]
        name: String,
        /// ingest (default) and/or publish; repeatable.
        #[arg(long = "scope", value_parser = scope_parser())]
        scopes: Vec<KeyScope>,
        #[command(flatten)]
        db: DbArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve(cli.serve));
    let log_format = match &command {
        Command::Serve(a) | Command::Demo(a) => a.log_format,
        _ => LogFormat::Text,
    };
    // The demo's simulator posts every second; its request lines would bury everything else.
    let quiet_requests = matches!(command, Command::Demo(_));
    init_tracing(log_format, quiet_requests);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    match runtime.block_on(dispatch(command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("{e:#}")),
    }
}

fn fail(message: String) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

fn init_tracing(format: LogFormat, quiet_requests: bool) {
    let default = if quiet_requests {
        "info,sqlx=warn,socketioxide=warn,engineioxide=warn,tower_http=warn"
    } else {
        "info,sqlx=warn,socketioxide=warn,engineioxide=warn"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => serve(args, false).await,
        Command::Demo(args) => serve(args, true).await,
        Command::Migrate(db) => {
            sensorwire::config::check_database_url(&db.database_url)?;
            Store::open(&db.database_url).await?;
            println!("migrations applied to {}", redact(&db.database_url));
            Ok(())
        }
        Command::Token(args) => token(args),
        Command::Apikey {
            command:
                ApikeyCommand::Create {
                    org,
                    name,
                    scopes,
                    db,
                },
        } => {
            sensorwire::config::check_database_url(&db.database_url)?;
            let store = Store::open(&db.database_url).await?;
            let scopes = if scopes.is_empty() {
                vec![KeyScope::Ingest]
            } else {
                scopes
            };
            let key = sensorwire::http::create_key(&store, &org, &name, scopes).await?;
            println!("id:     {}", key.id);
            println!("key:    {}", key.key);
            let scopes: Vec<&str> = key.scopes.iter().map(|s| s.as_ref()).collect();
            println!("scopes: {}", scopes.join(","));
            println!("(the key is shown only now; send it as X-API-Key)");
            Ok(())
        }
        Command::Proto { dir } => {
            sensorwire::proto::write(&dir)?;
            println!("wrote {}", dir.display());
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs, demo: bool) -> anyhow::Result<()> {
    let config = Config::from_args(args)?;
    let listener = TcpListener::bind(config.addr)
        .await
        .map_err(|e| anyhow::anyhow!("HOST/PORT: cannot listen on {}: {e}", config.addr))?;
    let local = listener.local_addr()?;
    let shown = if local.ip().is_unspecified() {
        format!("http://localhost:{}", local.port())
    } else {
        format!("http://{local}")
    };
    let shutdown = shutdown_signal();
    let server = if demo {
        tokio::spawn(sensorwire::demo::run(config, listener, shutdown))
    } else {
        tokio::spawn(sensorwire::run(config, listener, shutdown))
    };
    // Printed once the listener is bound: tests and scripts wait for this line.
    println!("sensorwire listening on {shown}");
    if demo {
        println!();
        println!("  Live dashboard:  {shown}/   (signs in as the demo organisation by itself)");
        println!("  A simulator posts readings for 6 units every second; every 40 s one unit");
        println!("  warms up for 12 s, raising an alert that resolves when it recovers.");
        println!("  Ctrl-C stops it. Data lives in ./data/.");
        println!();
    }
    server.await?
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    let role = match args.role.as_str() {
        "viewer" => Role::Viewer,
        "operator" => Role::Operator,
        "admin" => Role::Admin,
        other => anyhow::bail!("--role: {other:?} is not viewer, operator or admin"),
    };
    let configured = args.jwt.jwt_secret.is_some();
    let dev = if configured {
        None
    } else {
        Some(sensorwire::auth::jwt::dev_secret(std::path::Path::new(
            sensorwire::DATA_DIR,
        ))?)
    };
    let verifier = sensorwire::auth::JwtVerifier::from_args(
        &JwtArgs {
            jwt_public_key_file: None,
            jwks_file: None,
            ..args.jwt
        },
        dev,
    )?;
    let claims = UserClaims {
        sub: args.sub,
        org_id: args.org,
        role,
        site_ids: (!args.sites.is_empty()).then_some(args.sites),
        exp: now_secs() + args.ttl,
    };
    let token = verifier
        .mint(&claims)
        .ok_or_else(|| anyhow::anyhow!("tokens can only be minted with an HS256 secret"))?;
    println!("{token}");
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        tokio::signal::ctrl_c().await.ok();
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

/// `--scope`: one of the scopes' names, as strum spells them.
fn scope_parser() -> impl clap::builder::TypedValueParser<Value = KeyScope> {
    use clap::builder::TypedValueParser;
    use strum::VariantNames;
    clap::builder::PossibleValuesParser::new(KeyScope::VARIANTS)
        .map(|s| s.parse::<KeyScope>().expect("one of the variants"))
}
