//! Request tracing (issue 19): which requests are traced, the spans recorded for them, the
//! context headers read from the client and sent to the backend, and the export of finished
//! traces off the request path.
//!
//! * [`context`] — the three context headers, parsed and written per dialect.
//! * this file — [`TraceSettings`] (from the flags), [`Tracer`] (one per proxy: the sampler
//!   and the export queue) and [`Recorder`] (one per *traced* request, shared by the phases
//!   through `Ctx::trace`; an untraced request has none). Under ESPv2 an untraced request
//!   still has a trace ID, its outgoing context headers (two allocations for all values) and
//!   its report's `trace` (written at the flush); docs/performance.md has what that costs.
//! * [`export`] — the exporter task: Cloud Trace v1 (ESP), v2 `batchWrite` (ESPv2), OTLP/HTTP.
//!
//! The pipeline's touch points are small: `Pipeline::handle` starts the recorder, names the
//! root and writes the outgoing headers; `check_and_quota` and `authenticate` record their
//! spans; the response's completion holds the recorder until the body is sent, and dropping
//! the last handle ends the root (and Backend) spans and queues the trace.

pub mod context;
pub mod export;

use crate::dialect::Dialect;
use context::{Format, Parent};
use http::HeaderMap;
use rand::rngs::{OsRng, SmallRng};
use rand::{Rng as _, RngCore as _, SeedableRng as _};
use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Tracing as the command line configured it.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    /// `--disable_tracing` (ESPv2): nothing traced, no headers read or written.
    pub disabled: bool,
    /// ESP: at most one auto-sampled request per this interval (`1 / minimum_qps`; `None`:
    /// `--disable_cloud_trace_auto_sampling`). ESPv2 uses `sample_rate` instead.
    pub auto_interval: Option<Duration>,
    /// ESPv2's `--tracing_sample_rate` (0 to 1).
    pub sample_rate: f64,
    /// ESPv2's `--tracing_incoming_context` / `--tracing_outgoing_context`.
    pub incoming: Vec<Format>,
    pub outgoing: Vec<Format>,
    /// `--tracing_project_id`; else the service's producer project.
    pub project_id: Option<String>,
    /// `--cloud_trace_url_override`: the Cloud Trace API's base URL; else the control plane
    /// that Service Control calls go to.
    pub url_override: Option<String>,
    /// `--tracing_otlp_endpoint`: OTLP/HTTP (protobuf) to this URL instead of Cloud Trace.
    pub otlp_endpoint: Option<String>,
}

impl TraceSettings {
    /// ESP v1's defaults: one auto-sampled request per 10 s (`minimum_qps` 0.1).
    pub fn esp() -> Self {
        TraceSettings {
            disabled: false,
            auto_interval: Some(Duration::from_secs(10)),
            sample_rate: 0.0,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            project_id: None,
            url_override: None,
            otlp_endpoint: None,
        }
    }

    /// ESPv2's defaults: rate 0.001, `traceparent,x-cloud-trace-context` both ways.
    pub fn espv2() -> Self {
        TraceSettings {
            disabled: false,
            auto_interval: None,
            sample_rate: 0.001,
            incoming: vec![Format::TraceParent, Format::CloudTrace],
            outgoing: vec![Format::TraceParent, Format::CloudTrace],
            project_id: None,
            url_override: None,
            otlp_endpoint: None,
        }
    }
}

impl Default for TraceSettings {
    fn default() -> Self {
        Self::esp()
    }
}

/// A finished span.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanRecord {
    pub id: u64,
    /// 0: none.
    pub parent: u64,
    pub name: Cow<'static, str>,
    pub start: SystemTime,
    pub end: SystemTime,
    pub kind: Kind,
    pub labels: Vec<(Cow<'static, str>, String)>,
}

/// What OTLP calls the span's kind (Cloud Trace v1 has only `RPC_SERVER`, which ESP sets on
/// every span).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Server,
    Client,
    Internal,
}

/// A finished trace, as queued for export.
#[derive(Debug, Clone)]
pub struct FinishedTrace {
    pub trace_id: [u8; 16],
    /// ESP: the client's `X-Cloud-Trace-Context` trace ID text, exported as sent.
    pub trace_text: Option<String>,
    /// In export order (ESP: root first; ESPv2: children first).
    pub spans: Vec<SpanRecord>,
}

/// Why a request is traced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A context header asked for it.
    Header,
    /// The sampler picked it.
    Sampled,
}

/// What [`Tracer::begin`] decided for a request.
#[derive(Debug)]
pub enum Started {
    /// No trace at all (ESP's untraced requests, `--disable_tracing`).
    Off,
    /// ESPv2, not sampled: the trace ID its report names and its outgoing headers carry.
    Unsampled([u8; 16]),
    Traced(Arc<Recorder>),
}

/// ESP v1's sampler: a rate limiter, not a probability (reference §1.2). Lock-free: one
/// atomic load on the untraced path.
#[derive(Debug)]
pub struct AutoSampler {
    interval_ns: Option<u64>,
    epoch: Instant,
    /// Nanoseconds after `epoch` of the last traced request; `u64::MAX`: none yet.
    last: AtomicU64,
}

impl AutoSampler {
    pub fn new(interval: Option<Duration>) -> Self {
        AutoSampler {
            interval_ns: interval.map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            epoch: Instant::now(),
            last: AtomicU64::new(u64::MAX),
        }
    }

    fn now_ns(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// Whether an unforced request at `now` is traced; if so the slot is taken.
    pub fn sample(&self, now: Instant) -> bool {
        let Some(interval) = self.interval_ns else {
            return false;
        };
        let now = self.now_ns(now);
        let last = self.last.load(Ordering::Relaxed);
        if last != u64::MAX && now.saturating_sub(last) <= interval {
            return false;
        }
        // Only one of the requests racing for the slot wins it.
        self.last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// A header-forced trace uses up the current slot too (ESP resets the clock).
    pub fn reset(&self, now: Instant) {
        self.last.store(self.now_ns(now), Ordering::Relaxed);
    }
}

/// One per proxy: the sampler, the settings and the export queue.
pub struct Tracer {
    pub dialect: Dialect,
    pub settings: TraceSettings,
    sampler: AutoSampler,
    queue: export::Queue,
    /// `trace.cloud.google.com/agent` (ESP) or `g.co/agent` (ESPv2) on every span.
    agent: String,
    /// The tracing project, for ESPv2's report field `trace: projects/P/traces/T` (`None`:
    /// reports name no trace).
    report_project: Option<Arc<str>>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("dialect", &self.dialect)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

thread_local! {
    /// Where trace and span IDs come from. They must be unique, not unpredictable (they guard
    /// nothing): a per-thread xoshiro costs ~75 instructions for a request's two IDs where
    /// `rand::random`'s ChaCha cost ~360 (callgrind, docs/performance.md) — and ESPv2 makes a
    /// trace ID on every request, sampled or not.
    static IDS: RefCell<SmallRng> = RefCell::new(fresh_ids());
}

/// A generator seeded from the OS; if the OS cannot give a seed, from the clock (never a
/// panic on the request path).
fn fresh_ids() -> SmallRng {
    SmallRng::from_rng(OsRng).unwrap_or_else(|_| {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        SmallRng::seed_from_u64((nanos >> 64) as u64 ^ nanos as u64)
    })
}

/// `f` on the thread's ID generator (on a one-off one if the thread's is gone, as in a
/// thread-local destructor).
fn with_ids<T>(f: impl Fn(&mut SmallRng) -> T) -> T {
    IDS.try_with(|r| f(&mut r.borrow_mut()))
        .unwrap_or_else(|_| f(&mut fresh_ids()))
}

/// A non-zero random span ID.
pub fn new_span_id() -> u64 {
    loop {
        let id = with_ids(|r| r.next_u64());
        if id != 0 {
            return id;
        }
    }
}

fn new_trace_id() -> [u8; 16] {
    loop {
        let id: u128 = with_ids(|r| r.gen());
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

/// Whether a request is picked at `rate` (0 never, 1 always).
fn picked(rate: f64) -> bool {
    rate > 0.0 && with_ids(|r| r.gen::<f64>()) < rate
}

/// ESPv2's report `trace` of a request: `projects/P/traces/T`. Kept as the project and the ID
/// until the log entry is written (at the flush, off the request path).
#[derive(Debug, Clone)]
pub struct TraceName {
    pub project: Arc<str>,
    pub trace_id: [u8; 16],
}

impl TraceName {
    /// `projects/P/traces/T`.
    pub fn to_name(&self) -> String {
        let mut s = String::new();
        context::push_trace_name(&mut s, &self.project, &self.trace_id);
        s
    }
}

impl Tracer {
    pub fn new(dialect: Dialect, settings: TraceSettings, queue: export::Queue) -> Self {
        let agent = match dialect {
            Dialect::Esp => format!("esp/portico-{}", env!("CARGO_PKG_VERSION")),
            Dialect::EspV2 => format!("portico [{}]", env!("CARGO_PKG_VERSION")),
        };
        Tracer {
            dialect,
            sampler: AutoSampler::new(settings.auto_interval),
            settings,
            queue,
            agent,
            report_project: None,
        }
    }

    /// The tracing project ESPv2's reports name traces in.
    pub fn with_report_project(mut self, project: String) -> Self {
        self.report_project = (!project.is_empty()).then(|| Arc::from(project));
        self
    }

    /// Traced spans dropped because the export queue was full.
    pub fn dropped(&self) -> u64 {
        self.queue.dropped()
    }

    /// The sampling decision for a request with these headers: `None` (the common case)
    /// allocates nothing.
    pub fn decide<'h>(
        &self,
        headers: &'h HeaderMap,
        now: Instant,
    ) -> Option<(Decision, Option<Parent<'h>>)> {
        self.decide_inner(headers, now).ok()
    }

    /// `Ok`: traced; `Err`: not, with the (unsampled) parent ESPv2 read, if any.
    fn decide_inner<'h>(
        &self,
        headers: &'h HeaderMap,
        now: Instant,
    ) -> Result<(Decision, Option<Parent<'h>>), Option<Parent<'h>>> {
        if self.settings.disabled {
            return Err(None);
        }
        match self.dialect {
            Dialect::Esp => {
                let parent = context::incoming_esp(headers);
                if let Some(p) = parent.filter(|p| p.sampled) {
                    self.sampler.reset(now);
                    return Ok((Decision::Header, Some(p)));
                }
                // `o=0` does not opt out; the sampler may still pick the request, with a new
                // trace ID (the header is not joined).
                if self.sampler.sample(now) {
                    Ok((Decision::Sampled, None))
                } else {
                    Err(None)
                }
            }
            Dialect::EspV2 => {
                let parent = context::incoming_espv2(headers, &self.settings.incoming);
                if parent.is_some_and(|p| p.sampled) {
                    return Ok((Decision::Header, parent));
                }
                // An unsampled parent may still be picked at the rate, and joined.
                if picked(self.settings.sample_rate) {
                    Ok((Decision::Sampled, parent))
                } else {
                    Err(parent)
                }
            }
        }
    }

    /// Starts recording a request when [`Tracer::decide`] says so.
    pub fn start(self: &Arc<Self>, headers: &HeaderMap) -> Option<Arc<Recorder>> {
        match self.begin(headers) {
            Started::Traced(r) => Some(r),
            Started::Unsampled(_) | Started::Off => None,
        }
    }

    /// A request's trace: recorded when traced; under ESPv2 an untraced request still has a
    /// trace ID (the incoming context's, else a new one), as Envoy's OpenCensus driver gives
    /// every request a span, sampled or not: reports name it and the outgoing context headers
    /// carry it with the sampled flag off. Only `Traced` allocates.
    pub fn begin(self: &Arc<Self>, headers: &HeaderMap) -> Started {
        let now = Instant::now();
        let (decision, parent) = match self.decide_inner(headers, now) {
            Ok(d) => d,
            Err(parent) => {
                return match self.dialect {
                    Dialect::EspV2 if !self.settings.disabled => {
                        Started::Unsampled(parent.map(|p| p.trace_id).unwrap_or_else(new_trace_id))
                    }
                    _ => Started::Off,
                };
            }
        };
        let (trace_id, parent_span, options, format, trace_text) = match parent {
            Some(p) => (
                p.trace_id,
                p.span_id,
                p.options.map(str::to_string),
                Some(p.format),
                p.trace_text
                    .filter(|_| self.dialect == Dialect::Esp)
                    .map(str::to_string),
            ),
            None => (new_trace_id(), 0, None, None, None),
        };
        let _ = decision;
        Started::Traced(Arc::new(Recorder {
            tracer: self.clone(),
            trace_id,
            root_id: new_span_id(),
            root_parent: parent_span,
            incoming: format,
            esp_options: options,
            trace_text,
            start: SystemTime::now(),
            inner: Mutex::new(Inner::default()),
        }))
    }

    /// `projects/P/traces/T` for ESPv2's report (`None` for ESP, whose reports carry no trace,
    /// or without a tracing project).
    pub fn trace_name(&self, trace_id: &[u8; 16]) -> Option<TraceName> {
        let project = self.report_project.as_ref()?;
        (self.dialect == Dialect::EspV2).then(|| TraceName {
            project: project.clone(),
            trace_id: *trace_id,
        })
    }

    /// ESPv2's `--tracing_outgoing_context` headers with `span_id` as the parent, replacing any
    /// client copy (two allocations for all of them: [`context::write_outgoing`]).
    pub fn write_outgoing(
        &self,
        trace_id: &[u8; 16],
        span_id: u64,
        sampled: bool,
        headers: &mut HeaderMap,
    ) {
        let out = context::Outgoing {
            trace_id,
            trace_text: None,
            span_id,
            sampled,
            esp_options: None,
        };
        context::write_outgoing(&self.settings.outgoing, self.dialect, &out, headers);
    }

    fn submit(&self, trace: FinishedTrace) {
        self.queue.push(trace);
    }
}

#[derive(Default)]
struct Inner {
    root_name: String,
    root_labels: Vec<(Cow<'static, str>, String)>,
    spans: Vec<SpanRecord>,
    /// The Backend span: its ID, name and start; it ends with the root.
    backend: Option<(u64, Cow<'static, str>, SystemTime)>,
}

/// One traced request's spans. The phases record into it through `&self`; the last handle
/// dropped (the response's completion, after the body was sent) ends the root and queues the
/// trace. Never blocks: the queue drops and counts when full.
pub struct Recorder {
    tracer: Arc<Tracer>,
    pub trace_id: [u8; 16],
    pub root_id: u64,
    /// The client's span (0: none).
    pub root_parent: u64,
    /// The header the context came in (ESP answers in the same one).
    incoming: Option<Format>,
    esp_options: Option<String>,
    /// ESP: the client's trace ID text (case kept), forwarded and exported as sent.
    trace_text: Option<String>,
    start: SystemTime,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("trace_id", &context::hex(&self.trace_id))
            .field("root_id", &self.root_id)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    pub fn dialect(&self) -> Dialect {
        self.tracer.dialect
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> Option<R> {
        // A poisoned lock loses this trace's spans, never the request.
        self.inner.lock().ok().map(|mut i| f(&mut i))
    }

    /// `projects/P/traces/T` for ESPv2's report (`None` for ESP, whose reports carry no trace,
    /// or without a tracing project).
    pub fn trace_name(&self) -> Option<TraceName> {
        self.tracer.trace_name(&self.trace_id)
    }

    /// ESPv2's context for the request's Service Control `:check`.
    pub fn check_context(&self) -> CheckContext<'_> {
        CheckContext {
            tracer: &self.tracer,
            trace_id: self.trace_id,
            sampled: true,
        }
    }

    /// The root span's name, once the operation is known.
    pub fn set_root_name(&self, name: String) {
        self.with(|i| i.root_name = name);
    }

    /// A label (ESP) or attribute (ESPv2, OTLP) on the root span.
    pub fn root_label(&self, key: &'static str, value: String) {
        self.with(|i| {
            i.root_labels.retain(|(k, _)| k != key);
            i.root_labels.push((Cow::Borrowed(key), value));
        });
    }

    /// Records a finished span; returns its ID so children can name it.
    pub fn span(
        &self,
        id: u64,
        name: impl Into<Cow<'static, str>>,
        parent: u64,
        start: SystemTime,
        end: SystemTime,
        kind: Kind,
    ) -> u64 {
        let name = name.into();
        self.with(|i| {
            i.spans.push(SpanRecord {
                id,
                parent,
                name,
                start,
                end,
                kind,
                labels: Vec::new(),
            })
        });
        id
    }

    /// Starts the Backend span (it ends with the root) and writes the outgoing context
    /// headers with it as the parent.
    pub fn start_backend(&self, name: impl Into<Cow<'static, str>>, headers: &mut HeaderMap) {
        let id = new_span_id();
        let name = name.into();
        self.with(|i| i.backend = Some((id, name, SystemTime::now())));
        let dialect = self.tracer.dialect;
        let formats: &[Format] = match dialect {
            // ESP answers in the header the context came in, else X-Cloud-Trace-Context.
            Dialect::Esp => match self.incoming {
                Some(Format::GrpcTraceBin) => &[Format::GrpcTraceBin],
                _ => &[Format::CloudTrace],
            },
            Dialect::EspV2 => &self.tracer.settings.outgoing,
        };
        let out = context::Outgoing {
            trace_id: &self.trace_id,
            trace_text: self.trace_text.as_deref(),
            span_id: id,
            sampled: true,
            esp_options: self.esp_options.as_deref(),
        };
        context::write_outgoing(formats, dialect, &out, headers);
    }

    /// The root's name: ESP's `<service>/<selector>` (`<service>/<Unknown Operation Name>`),
    /// or ESPv2's `ingress <method short name>` (`ingress UnknownOperationName`).
    pub fn name_root(&self, service: &str, selector: Option<&str>) {
        let name = match (self.dialect(), selector) {
            (Dialect::Esp, Some(s)) => format!("{service}/{s}"),
            (Dialect::Esp, None) => format!("{service}/<Unknown Operation Name>"),
            (Dialect::EspV2, Some(s)) => {
                format!("ingress {}", s.rsplit('.').next().unwrap_or(s))
            }
            (Dialect::EspV2, None) => "ingress UnknownOperationName".to_string(),
        };
        self.set_root_name(name);
    }

    /// The response status, as ESPv2's ingress span carries it (`http.status_code`).
    pub fn set_status(&self, status: u16) {
        if self.dialect() == Dialect::EspV2 {
            self.root_label("http.status_code", status.to_string());
        }
    }

    /// The spans so far (tests and the status page).
    pub fn snapshot(&self) -> Vec<SpanRecord> {
        self.with(|i| i.spans.clone()).unwrap_or_default()
    }

    fn finish(&self) -> FinishedTrace {
        let end = SystemTime::now();
        let inner = self.with(std::mem::take).unwrap_or_default();
        let dialect = self.tracer.dialect;
        let agent_key: &'static str = match dialect {
            Dialect::Esp => "trace.cloud.google.com/agent",
            Dialect::EspV2 => "g.co/agent",
        };
        let root_kind = Kind::Server;
        let mut root_labels = inner.root_labels;
        root_labels.push((Cow::Borrowed(agent_key), self.tracer.agent.clone()));
        let root_name = if inner.root_name.is_empty() {
            match dialect {
                Dialect::Esp => "<Unknown Operation Name>".to_string(),
                Dialect::EspV2 => "ingress UnknownOperationName".to_string(),
            }
        } else {
            inner.root_name
        };
        let root = SpanRecord {
            id: self.root_id,
            parent: self.root_parent,
            name: Cow::Owned(root_name),
            start: self.start,
            end,
            kind: root_kind,
            labels: root_labels,
        };
        let mut children = inner.spans;
        if let Some((id, name, start)) = inner.backend {
            children.push(SpanRecord {
                id,
                parent: self.root_id,
                name,
                start,
                end,
                kind: Kind::Client,
                labels: Vec::new(),
            });
        }
        // In the order they started, a parent before the children that started with it (ESP's
        // order: the order the spans were created).
        let depth = |s: &SpanRecord| {
            let mut d = 0;
            let mut p = s.parent;
            while p != self.root_id && d < 8 {
                match children.iter().find(|c| c.id == p) {
                    Some(c) => p = c.parent,
                    None => break,
                }
                d += 1;
            }
            d
        };
        let mut keyed: Vec<(SystemTime, usize, SpanRecord)> = Vec::with_capacity(children.len());
        for s in &children {
            keyed.push((s.start, depth(s), s.clone()));
        }
        keyed.sort_by_key(|a| (a.0, a.1));
        let mut children: Vec<SpanRecord> = keyed.into_iter().map(|k| k.2).collect();
        for s in &mut children {
            s.labels
                .push((Cow::Borrowed(agent_key), self.tracer.agent.clone()));
        }
        let spans = match dialect {
            Dialect::Esp => {
                let mut v = Vec::with_capacity(children.len() + 1);
                v.push(root);
                v.extend(children);
                v
            }
            Dialect::EspV2 => {
                children.push(root);
                children
            }
        };
        FinishedTrace {
            trace_id: self.trace_id,
            trace_text: self.trace_text.clone(),
            spans,
        }
    }
}

/// Where a Service Control call made on a cache miss records its span: ESP's `Call
/// ServiceControl server` under the cache span, ESPv2's `Service Control remote call: Check`
/// under the ingress span.
#[derive(Clone, Copy, Debug)]
pub struct RemoteCall<'a> {
    pub recorder: &'a Recorder,
    pub parent: u64,
}

impl RemoteCall<'_> {
    /// Records the call: one span per attempt for ESPv2 (the retries `... - Retry N`, each the
    /// parent of the context its attempt carried), one span for the whole call for ESP.
    pub fn record(&self, start: SystemTime, attempts: &[(u64, SystemTime, SystemTime)]) {
        match self.recorder.dialect() {
            Dialect::Esp => {
                self.recorder.span(
                    new_span_id(),
                    "Call ServiceControl server",
                    self.parent,
                    start,
                    SystemTime::now(),
                    Kind::Client,
                );
            }
            Dialect::EspV2 => {
                for (n, (id, start, end)) in attempts.iter().enumerate() {
                    let name: Cow<'static, str> = match n {
                        0 => Cow::Borrowed("Service Control remote call: Check"),
                        n => Cow::Owned(format!("Service Control remote call: Check - Retry {n}")),
                    };
                    self.recorder
                        .span(*id, name, self.parent, *start, *end, Kind::Client);
                }
            }
        }
    }
}

/// ESPv2 writes the request's context on its Service Control `:check` (a cache miss; not on
/// quota or report calls, nor on cache refreshes, which Envoy sends with no span), traced or
/// not, each attempt with its own span as the parent.
#[derive(Clone, Copy)]
pub struct CheckContext<'a> {
    pub tracer: &'a Arc<Tracer>,
    pub trace_id: [u8; 16],
    pub sampled: bool,
}

impl std::fmt::Debug for CheckContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckContext")
            .field("trace_id", &context::hex(&self.trace_id))
            .field("sampled", &self.sampled)
            .finish()
    }
}

impl CheckContext<'_> {
    /// What the call's task needs (it outlives no borrow).
    pub fn call(&self) -> Arc<CallTrace> {
        Arc::new(CallTrace {
            tracer: self.tracer.clone(),
            trace_id: self.trace_id,
            sampled: self.sampled,
            attempts: Mutex::new(Vec::new()),
        })
    }
}

/// One Service Control call's trace context: each attempt (ESPv2 starts a span per attempt,
/// retries named `... - Retry N`) gets a new span ID, the parent of the headers it carries, and
/// its times are kept for the request to record once the call is over.
pub struct CallTrace {
    tracer: Arc<Tracer>,
    trace_id: [u8; 16],
    sampled: bool,
    /// Each attempt's span ID, start and end.
    attempts: Mutex<Vec<(u64, SystemTime, SystemTime)>>,
}

impl std::fmt::Debug for CallTrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallTrace")
            .field("trace_id", &context::hex(&self.trace_id))
            .finish_non_exhaustive()
    }
}

/// An attempt under way: its span and start.
#[derive(Debug)]
pub struct Attempt {
    span_id: u64,
    start: SystemTime,
}

impl CallTrace {
    /// Starts an attempt: its context headers, written into `headers`.
    pub fn begin(&self, headers: &mut HeaderMap) -> Attempt {
        let span_id = new_span_id();
        self.tracer
            .write_outgoing(&self.trace_id, span_id, self.sampled, headers);
        Attempt {
            span_id,
            start: SystemTime::now(),
        }
    }

    pub fn end(&self, a: Attempt) {
        if let Ok(mut v) = self.attempts.lock() {
            v.push((a.span_id, a.start, SystemTime::now()));
        }
    }

    /// The attempts so far: span ID, start, end.
    pub fn attempts(&self) -> Vec<(u64, SystemTime, SystemTime)> {
        self.attempts.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// ESP's `FetchAccessToken` (the first step of its check workflow): a traced request that finds
/// the metadata server's access token missing or due fetches it before anything else, under
/// this span, a child of the root. The outcome is not acted on here: it is cached, and the
/// Service Control call that needs the token uses it (or its failure) as before.
pub async fn fetch_access_token(r: &Recorder, tokens: &crate::outbound_auth::MetadataTokens) {
    let start = SystemTime::now();
    let _ = tokens.authorization().await;
    r.span(
        new_span_id(),
        "FetchAccessToken",
        r.root_id,
        start,
        SystemTime::now(),
        Kind::Client,
    );
}

/// ESP's `FetchIdentityToken`: a backend ID token fetched from the metadata server on a traced
/// request's path, a child of the root.
pub async fn fetch_identity_token<T>(
    r: &Recorder,
    fetch: impl std::future::Future<Output = T>,
) -> T {
    let start = SystemTime::now();
    let out = fetch.await;
    r.span(
        new_span_id(),
        "FetchIdentityToken",
        r.root_id,
        start,
        SystemTime::now(),
        Kind::Client,
    );
    out
}

tokio::task_local! {
    /// Set around a traced request's authentication: where a key-set fetch made on the
    /// request's own task records its span (ESP's `HttpFetch` under `CheckAuth`, ESPv2's
    /// `JWT Remote PubKey Fetch` under the ingress span). Background refreshes run in their
    /// own tasks and are not part of any request's trace.
    static FETCH_PARENT: (Arc<Recorder>, u64);
}

pin_project_lite::pin_project! {
    /// [`auth_phase`]'s future: the authentication phase's own future, in the task-local
    /// scope only when traced, recording ESP's `CheckAuth` span when it completes.
    /// Hand-written, not an `async fn`, so that it holds the phase's future once (an `async
    /// fn` would keep its argument beside the scope it is moved into, doubling what the
    /// request future, kept per connection, reserves for it), and so that the request future
    /// holds nothing else for tracing across this await.
    #[project = AuthPhaseProj]
    pub enum AuthPhase<F> {
        Traced {
            #[pin]
            fut: tokio::task::futures::TaskLocalFuture<(Arc<Recorder>, u64), F>,
            // ESP's CheckAuth span: the recorder, its ID and start.
            check_auth: Option<Box<(Arc<Recorder>, u64, SystemTime)>>,
        },
        Plain { #[pin] fut: F },
    }
}

impl<F: std::future::Future> std::future::Future for AuthPhase<F> {
    type Output = F::Output;
    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        match self.project() {
            AuthPhaseProj::Traced { fut, check_auth } => {
                let out = std::task::ready!(fut.poll(cx));
                if let Some(c) = check_auth.take() {
                    let (r, id, start) = *c;
                    r.span(
                        id,
                        "CheckAuth",
                        r.root_id,
                        start,
                        SystemTime::now(),
                        Kind::Internal,
                    );
                }
                std::task::Poll::Ready(out)
            }
            AuthPhaseProj::Plain { fut } => fut.poll(cx),
        }
    }
}

/// The authentication phase (`fut`) of a request: untraced, or for a method without JWT
/// requirements, run as is; else key-set fetches on this task record their spans (under
/// `CheckAuth` for ESP, under the ingress span for ESPv2) and ESP's `CheckAuth` is recorded.
pub fn auth_phase<F: std::future::Future>(
    trace: Option<&Arc<Recorder>>,
    needs_auth: bool,
    fut: F,
) -> AuthPhase<F> {
    match trace.filter(|_| needs_auth) {
        Some(r) => {
            let (parent, check_auth) = match r.dialect() {
                Dialect::Esp => {
                    let id = new_span_id();
                    (id, Some(Box::new((r.clone(), id, SystemTime::now()))))
                }
                Dialect::EspV2 => (r.root_id, None),
            };
            AuthPhase::Traced {
                fut: FETCH_PARENT.scope((r.clone(), parent), fut),
                check_auth,
            }
        }
        None => AuthPhase::Plain { fut },
    }
}

/// When a key-set fetch starts on a traced request's task: `Some(now)`; else `None`, without
/// reading the clock.
pub fn fetch_started() -> Option<SystemTime> {
    FETCH_PARENT.try_with(|_| SystemTime::now()).ok()
}

/// Records the key-set fetch that started at `start` (from [`fetch_started`]).
pub fn fetch_finished(start: Option<SystemTime>) {
    let Some(start) = start else { return };
    let _ = FETCH_PARENT.try_with(|(r, parent)| {
        let name = match r.dialect() {
            Dialect::Esp => "HttpFetch",
            Dialect::EspV2 => "JWT Remote PubKey Fetch",
        };
        r.span(
            new_span_id(),
            name,
            *parent,
            start,
            SystemTime::now(),
            Kind::Client,
        );
    });
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let t = self.finish();
        self.tracer.submit(t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_non_zero_and_differ_across_threads_and_calls() {
        let here: Vec<[u8; 16]> = (0..64).map(|_| new_trace_id()).collect();
        let there = std::thread::spawn(|| (0..64).map(|_| new_trace_id()).collect::<Vec<_>>())
            .join()
            .expect("thread");
        let all: std::collections::HashSet<_> = here.iter().chain(&there).collect();
        assert_eq!(
            all.len(),
            128,
            "every trace ID differs, per thread and across threads"
        );
        assert!(!all.contains(&[0; 16]));
        // Two fresh generators (the fallback once a thread's is gone) do not repeat each other.
        let (mut a, mut b) = (fresh_ids(), fresh_ids());
        assert_ne!(
            (0..4).map(|_| a.next_u64()).collect::<Vec<_>>(),
            (0..4).map(|_| b.next_u64()).collect::<Vec<_>>()
        );
        let spans: std::collections::HashSet<u64> = (0..64).map(|_| new_span_id()).collect();
        assert_eq!(spans.len(), 64);
        assert!(!spans.contains(&0));
    }

    #[test]
    fn picked_follows_the_rate() {
        assert!((0..10_000).all(|_| !picked(0.0)));
        assert!((0..10_000).all(|_| !picked(-1.0)));
        assert!((0..10_000).all(|_| picked(1.0)));
        let n = (0..100_000).filter(|_| picked(0.25)).count();
        // 25,000 expected; ±1,000 is more than seven standard deviations (~137 each).
        assert!((24_000..26_000).contains(&n), "{n} of 100,000 at 0.25");
    }

    #[test]
    fn trace_names_are_espv2_only_and_need_a_project() {
        let q = || export::Queue::for_test(1).0;
        let id = [0xc3; 16];
        let v2 = Tracer::new(Dialect::EspV2, TraceSettings::default(), q())
            .with_report_project("proj".into());
        let name = v2.trace_name(&id).expect("named");
        assert_eq!(
            name.to_name(),
            format!("projects/proj/traces/{}", "c3".repeat(16))
        );
        let none = Tracer::new(Dialect::EspV2, TraceSettings::default(), q())
            .with_report_project(String::new());
        assert!(none.trace_name(&id).is_none());
        let esp = Tracer::new(Dialect::Esp, TraceSettings::default(), q())
            .with_report_project("proj".into());
        assert!(esp.trace_name(&id).is_none());
    }

    #[test]
    fn auto_sampler_is_a_rate_limiter() {
        let s = AutoSampler::new(Some(Duration::from_secs(10)));
        let t0 = Instant::now();
        assert!(s.sample(t0), "the first request is traced");
        assert!(!s.sample(t0 + Duration::from_secs(5)));
        assert!(!s.sample(t0 + Duration::from_secs(10)));
        assert!(s.sample(t0 + Duration::from_millis(10_001)));
        // A forced trace takes the slot.
        s.reset(t0 + Duration::from_secs(15));
        assert!(!s.sample(t0 + Duration::from_secs(20)));
        assert!(s.sample(t0 + Duration::from_secs(26)));
        let off = AutoSampler::new(None);
        assert!(!off.sample(t0));
    }

    fn tracer(dialect: Dialect, settings: TraceSettings) -> Arc<Tracer> {
        Arc::new(Tracer::new(
            dialect,
            settings,
            export::Queue::for_test(16).0,
        ))
    }

    #[test]
    fn esp_decisions() {
        let mut s = TraceSettings::esp();
        s.auto_interval = None; // --disable_cloud_trace_auto_sampling
        let t = tracer(Dialect::Esp, s);
        let mut h = HeaderMap::new();
        let now = Instant::now();
        assert!(t.decide(&h, now).is_none());
        h.insert(
            &context::X_CLOUD_TRACE_CONTEXT,
            http::HeaderValue::from_static("0123456789abcdef0123456789abcdef/5;o=0"),
        );
        assert!(t.decide(&h, now).is_none(), "o=0 forces nothing");
        h.insert(
            &context::X_CLOUD_TRACE_CONTEXT,
            http::HeaderValue::from_static("0123456789abcdef0123456789abcdef/5;o=1"),
        );
        let (d, p) = t.decide(&h, now).expect("forced");
        assert_eq!(d, Decision::Header);
        assert_eq!(p.map(|p| p.span_id), Some(5));
        // traceparent means nothing to ESP.
        let mut h = HeaderMap::new();
        h.insert(
            &context::TRACEPARENT,
            http::HeaderValue::from_static(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        );
        assert!(t.decide(&h, now).is_none());
    }

    #[test]
    fn espv2_decisions() {
        let mut s = TraceSettings::espv2();
        s.sample_rate = 0.0;
        let t = tracer(Dialect::EspV2, s.clone());
        let mut h = HeaderMap::new();
        let now = Instant::now();
        assert!(t.decide(&h, now).is_none());
        h.insert(
            &context::TRACEPARENT,
            http::HeaderValue::from_static(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        );
        assert_eq!(t.decide(&h, now).map(|d| d.0), Some(Decision::Header));
        // Rate 1: every request, an unsampled parent joined.
        s.sample_rate = 1.0;
        let t = tracer(Dialect::EspV2, s.clone());
        h.insert(
            &context::TRACEPARENT,
            http::HeaderValue::from_static(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
            ),
        );
        let (d, p) = t.decide(&h, now).expect("sampled");
        assert_eq!(d, Decision::Sampled);
        assert_eq!(p.map(|p| p.span_id), Some(0xb7ad6b7169203331));
        s.disabled = true;
        assert!(tracer(Dialect::EspV2, s).decide(&h, now).is_none());
    }
}
