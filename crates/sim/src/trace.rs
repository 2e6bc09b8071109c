//! The trace of a run: one readable line per event (`node1 script start_prim WAIT ALONE start`,
//! `node2 vip acquire`, `node1 state ALONE ready`, ...).
//!
//! Two views are kept: a ring of the last lines with their times, printed when an invariant
//! breaks, and a *transcript* without times, for the expect-style tests of the automaton.

use std::collections::VecDeque;

use tandem_core::{Effect, Level, Outcome, Persisted, Time};

/// What a line is about (the transcript keeps some kinds only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// An operation applied to the world (fault, operator action, time jump).
    Op,
    /// An operator command and the core's reply.
    Command,
    /// A user script is called.
    Script,
    /// An adapter reported the end of a step.
    Done,
    /// VIP acquire or release requested.
    Vip,
    /// Data synchronisation requested.
    Sync,
    /// Module state change.
    State,
    /// Writes allowed or fenced.
    Writable,
    /// Record persisted.
    Persist,
    /// Scripts aborted (forcestop).
    Abort,
    /// A finished transition and its reason (from the core's log).
    Transition,
    /// Any other log line of the core.
    Log,
    /// Network traffic (only with verbose tracing).
    Net,
}

/// One line of the trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// Simulated time.
    pub at: Time,
    /// What it is about.
    pub kind: Kind,
    /// The text, starting with the node name.
    pub text: String,
}

impl std::fmt::Display for Line {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{:>10} {}", seconds(self.at), self.text)
    }
}

/// `12.345s`.
pub fn seconds(at: Time) -> String {
    format!("{}.{:03}s", at.0 / 1_000_000_000, (at.0 / 1_000_000) % 1000)
}

/// How much to record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceConfig {
    /// Lines kept for the failure report.
    pub ring: usize,
    /// Print every line to stdout as it happens (replay).
    pub echo: bool,
    /// Record network traffic too.
    pub verbose: bool,
    /// Keep the transcript.
    pub transcript: bool,
    /// Put the core's log lines in the transcript (not only transitions); the logs of operator
    /// commands never go there (the command line with the reply says it already).
    pub transcript_logs: bool,
}

impl Default for TraceConfig {
    fn default() -> TraceConfig {
        TraceConfig {
            ring: 200,
            echo: false,
            verbose: false,
            transcript: false,
            transcript_logs: false,
        }
    }
}

/// The recorded lines.
#[derive(Clone, Debug)]
pub struct Trace {
    config: TraceConfig,
    ring: VecDeque<Line>,
    transcript: Vec<String>,
}

impl Trace {
    /// An empty trace.
    pub fn new(config: TraceConfig) -> Trace {
        Trace {
            config,
            ring: VecDeque::new(),
            transcript: Vec::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> TraceConfig {
        self.config
    }

    /// Changes the configuration (the lines recorded so far stay).
    pub fn set_config(&mut self, config: TraceConfig) {
        self.config = config;
    }

    /// Whether lines of this kind are worth formatting at all.
    pub fn wants(&self, kind: Kind) -> bool {
        kind != Kind::Net || self.config.verbose
    }

    /// Records a line; `transcript` says whether the transcript shows it.
    pub fn record(&mut self, at: Time, kind: Kind, text: String, transcript: bool) {
        if !self.wants(kind) {
            return;
        }
        let line = Line { at, kind, text };
        if self.config.echo {
            println!("{line}");
        }
        if self.config.transcript && transcript {
            self.transcript.push(line.text.clone());
        }
        if self.config.ring > 0 {
            if self.ring.len() >= self.config.ring {
                self.ring.pop_front();
            }
            self.ring.push_back(line);
        }
    }

    /// The last `count` lines, formatted with their times.
    pub fn tail(&self, count: usize) -> Vec<String> {
        let skip = self.ring.len().saturating_sub(count);
        self.ring
            .iter()
            .skip(skip)
            .map(ToString::to_string)
            .collect()
    }

    /// Takes the transcript recorded since the last call.
    pub fn take_transcript(&mut self) -> Vec<String> {
        std::mem::take(&mut self.transcript)
    }
}

/// Formats an outcome.
pub fn outcome(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Ok => "ok".into(),
        Outcome::Failed(why) => format!("failed ({why})"),
        Outcome::TimedOut => "timed out".into(),
    }
}

/// Formats a persisted record.
pub fn record(record: &Persisted) -> String {
    format!(
        "{} epoch {}{}",
        record.claim.as_str(),
        record.epoch,
        if record.last_primary {
            " last_primary"
        } else {
            ""
        }
    )
}

/// The line for an effect, or `None` for effects that are not traced (broadcasts, replies:
/// the world formats replies with their command).
pub fn effect_line(node: &str, effect: &Effect) -> Option<(Kind, String)> {
    let line = match effect {
        Effect::Broadcast(snapshot) => {
            (Kind::Net, format!("{node} broadcast seq {}", snapshot.seq))
        }
        Effect::RunScript { call, .. } => (
            Kind::Script,
            format!(
                "{node} script {} {} {} {}{}",
                call.script.file_name(),
                call.current,
                call.next,
                call.action.as_str(),
                if call.force { " force" } else { "" }
            ),
        ),
        Effect::AbortScripts { .. } => (Kind::Abort, format!("{node} abort scripts")),
        Effect::AcquireVips { .. } => (Kind::Vip, format!("{node} vip acquire")),
        Effect::ReleaseVips { .. } => (Kind::Vip, format!("{node} vip release")),
        Effect::SyncData { .. } => (Kind::Sync, format!("{node} sync")),
        Effect::SetWritable { writable, .. } => (
            Kind::Writable,
            format!("{node} writable {}", if *writable { "on" } else { "off" }),
        ),
        Effect::Persist {
            record: persisted, ..
        } => (
            Kind::Persist,
            format!("{node} persist {}", record(persisted)),
        ),
        Effect::Log { level, message, .. } => {
            if let Some(transition) = message.strip_prefix("transition ") {
                (Kind::Transition, format!("{node} transition {transition}"))
            } else {
                let level = match level {
                    Level::Info => "info",
                    Level::Warn => "warn",
                    Level::Error => "error",
                };
                (Kind::Log, format!("{node} {level}: {message}"))
            }
        }
        Effect::StateChanged { state, ready, .. } => (
            Kind::State,
            format!(
                "{node} state {state} {}",
                if *ready { "ready" } else { "transient" }
            ),
        ),
        Effect::Reply { .. } => return None,
    };
    Some(line)
}
