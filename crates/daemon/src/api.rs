//! The control API server (resources in `tandem_api`), on the root-only Unix socket.

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tandem_api::{ApiError, CommandReply, Event, LogLines, LogWrite};
use tandem_core::Command;
use tokio::net::UnixListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::driver::{ApiRequest, Shared};

/// Binds the socket: its directory is created root-only, a stale socket is replaced, and the
/// socket itself is mode 0600.
pub(crate) fn bind(socket: &Path) -> Result<UnixListener> {
    let directory = socket
        .parent()
        .context("the control socket path has no directory")?;
    if !directory.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(directory)
            .with_context(|| format!("cannot create {}", directory.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        anyhow::bail!(
            "another tandem daemon is already listening on {}; stop it first",
            socket.display()
        );
    }
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", socket.display()))?;
    Ok(listener)
}

/// Serves until cancelled.
pub(crate) async fn serve(
    listener: UnixListener,
    shared: Shared,
    cancel: CancellationToken,
) -> Result<()> {
    axum::serve(listener, router(shared))
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
        .context("control API server failed")
}

fn router(shared: Shared) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/modules/{module}/commands/{command}", post(command))
        .route("/v1/modules/{module}/log", get(read_log).post(write_log))
        .route("/v1/events", get(events))
        .fallback(not_found)
        .with_state(shared)
}

struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, axum::Json(ApiError { error: self.1 })).into_response()
    }
}

async fn not_found() -> Failure {
    Failure(StatusCode::NOT_FOUND, "no such resource".into())
}

fn module_index(shared: &Shared, name: &str) -> Result<usize, Failure> {
    shared
        .config
        .modules
        .iter()
        .position(|module| module.name() == name)
        .ok_or_else(|| {
            Failure(
                StatusCode::NOT_FOUND,
                format!(
                    "no module {name:?}; configured: {}",
                    shared
                        .config
                        .modules
                        .iter()
                        .map(|module| module.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })
}

fn daemon_gone() -> Failure {
    Failure(
        StatusCode::SERVICE_UNAVAILABLE,
        "the daemon is shutting down".into(),
    )
}

async fn status(State(shared): State<Shared>) -> Result<axum::Json<tandem_api::Status>, Failure> {
    let (reply, answer) = oneshot::channel();
    shared
        .requests
        .send(ApiRequest::Status(reply))
        .await
        .map_err(|_| daemon_gone())?;
    answer.await.map(axum::Json).map_err(|_| daemon_gone())
}

async fn command(
    State(shared): State<Shared>,
    UrlPath((module, command)): UrlPath<(String, String)>,
) -> Result<axum::Json<CommandReply>, Failure> {
    let module = module_index(&shared, &module)?;
    let command = Command::parse(&command).ok_or_else(|| {
        Failure(
            StatusCode::NOT_FOUND,
            format!(
                "unknown command {command:?}; allowed: start, stop, restart, prim, second, swap, \
                 forcestop"
            ),
        )
    })?;
    let (reply, answer) = oneshot::channel();
    shared
        .requests
        .send(ApiRequest::Command {
            module,
            command,
            reply,
        })
        .await
        .map_err(|_| daemon_gone())?;
    match answer.await.map_err(|_| daemon_gone())? {
        Ok(message) => Ok(axum::Json(CommandReply { message })),
        Err(reason) => Err(Failure(StatusCode::CONFLICT, reason)),
    }
}

#[derive(Deserialize)]
struct LogQuery {
    n: Option<usize>,
    app: Option<bool>,
}

async fn read_log(
    State(shared): State<Shared>,
    UrlPath(module): UrlPath<String>,
    Query(query): Query<LogQuery>,
) -> Result<axum::Json<LogLines>, Failure> {
    let index = module_index(&shared, &module)?;
    let logs = &shared.logs[index];
    let count = query.n.unwrap_or(50).min(100_000);
    let lines = if query.app.unwrap_or(false) {
        logs.app.tail(count)
    } else {
        logs.module.tail(count)
    }
    .map_err(|error| {
        Failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read the log: {error}"),
        )
    })?;
    Ok(axum::Json(LogLines { lines }))
}

async fn write_log(
    State(shared): State<Shared>,
    UrlPath(module): UrlPath<String>,
    body: Bytes,
) -> Result<axum::Json<CommandReply>, Failure> {
    let index = module_index(&shared, &module)?;
    let write: LogWrite = serde_json::from_slice(&body)
        .map_err(|error| Failure(StatusCode::BAD_REQUEST, format!("bad log request: {error}")))?;
    let level = match write.level.as_str() {
        "info" => tandem_scripts::Level::Info,
        "warn" => tandem_scripts::Level::Warn,
        "error" => tandem_scripts::Level::Error,
        other => {
            return Err(Failure(
                StatusCode::BAD_REQUEST,
                format!("unknown level {other:?}; allowed: info, warn, error"),
            ));
        }
    };
    let message: String = write.message.chars().take(4096).collect();
    shared.logs[index].write(level, &message);
    Ok(axum::Json(CommandReply {
        message: "logged".into(),
    }))
}

async fn events(State(shared): State<Shared>) -> Response {
    let receiver = shared.events.subscribe();
    let stream = futures::stream::unfold((receiver, true), |(mut receiver, first)| async move {
        if first {
            return Some((line(&Event::Heartbeat), (receiver, false)));
        }
        loop {
            match tokio::time::timeout(Duration::from_secs(5), receiver.recv()).await {
                Err(_) => return Some((line(&Event::Heartbeat), (receiver, false))),
                Ok(Ok(event)) => return Some((line(&event), (receiver, false))),
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => continue,
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return None,
            }
        }
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn line(event: &Event) -> Result<Bytes, Infallible> {
    let mut bytes = serde_json::to_vec(event).unwrap_or_default();
    bytes.push(b'\n');
    Ok(Bytes::from(bytes))
}
