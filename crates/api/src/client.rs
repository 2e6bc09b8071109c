//! A client of the control API over the daemon's Unix socket.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use crate::{ApiError, Event};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon is not reachable.
    #[error(
        "cannot reach the tandem daemon at {socket} (is `tandem daemon` running, and are you \
         root?)"
    )]
    Connect {
        /// Socket path.
        socket: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// HTTP-level failure.
    #[error("control API request failed: {0}")]
    Http(String),
    /// The daemon refused the request.
    #[error("{message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The daemon's reason.
        message: String,
    },
    /// The answer did not parse.
    #[error("unexpected answer from the daemon: {0}")]
    Decode(String),
}

/// A client bound to one socket path. Each call opens its own connection.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response<Incoming>, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|error| ClientError::Http(error.to_string()))?;
        // The connection task ends when the response body is consumed or dropped.
        tokio::spawn(connection);
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "tandem");
        if body.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|error| ClientError::Http(error.to_string()))?;
        sender
            .send_request(request)
            .await
            .map_err(|error| ClientError::Http(error.to_string()))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let response = self.send(method, path, body).await?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|error| ClientError::Http(error.to_string()))?
            .to_bytes();
        if status != StatusCode::OK {
            let message = serde_json::from_slice::<ApiError>(&bytes)
                .map(|error| error.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Refused {
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&bytes).map_err(|error| ClientError::Decode(error.to_string()))
    }

    /// `GET path`, decoded.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body, decoded.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let bytes =
            serde_json::to_vec(body).map_err(|error| ClientError::Decode(error.to_string()))?;
        self.call(Method::POST, path, Some(bytes)).await
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<crate::Status, ClientError> {
        self.get("/v1/status").await
    }

    /// Sends an operator command to a module.
    pub async fn command(
        &self,
        module: &str,
        command: &str,
    ) -> Result<crate::CommandReply, ClientError> {
        self.post(
            &format!("/v1/modules/{module}/commands/{command}"),
            &serde_json::json!({}),
        )
        .await
    }

    /// Opens the event stream.
    pub async fn events(&self) -> Result<EventStream, ClientError> {
        let response = self.send(Method::GET, "/v1/events", None).await?;
        if response.status() != StatusCode::OK {
            return Err(ClientError::Refused {
                status: response.status().as_u16(),
                message: "event stream refused".into(),
            });
        }
        Ok(EventStream {
            body: response.into_body(),
            buffer: Vec::new(),
        })
    }
}

/// The event stream: one [`Event`] per line.
#[derive(Debug)]
pub struct EventStream {
    body: Incoming,
    buffer: Vec<u8>,
}

impl EventStream {
    /// The next event; `None` when the daemon closed the stream.
    pub async fn next(&mut self) -> Result<Option<Event>, ClientError> {
        loop {
            if let Some(position) = self.buffer.iter().position(|&byte| byte == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=position).collect();
                let line = &line[..line.len() - 1];
                if line.is_empty() {
                    continue;
                }
                return serde_json::from_slice(line)
                    .map(Some)
                    .map_err(|error| ClientError::Decode(error.to_string()));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(error)) => return Err(ClientError::Http(error.to_string())),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}
