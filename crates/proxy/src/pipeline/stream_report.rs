//! ESP v1's intermediate reports for long gRPC streams (`request_handler.cc`
//! `AttemptIntermediateReport`): while a call to a streaming method runs, at most one report
//! per `intermediate_report_min_interval` (10 s unless `--server_config_template` says
//! otherwise) carries the bytes moved since the previous one, the first also the call's
//! `request_count`; the final report then has the rest ([`ReportPart`]).
//!
//! The reporting is off the stream's path: a timer task per long call wakes once per
//! interval, reads two counters the stream updates as it goes (the request body's
//! [`BodyCount`], the response bytes here) and hands a record to the report aggregator, which
//! sends it in the background. The stream itself only adds to an atomic counter. As in ESP, a
//! stream that moved nothing since the last report gets no report for that interval.

use super::state::{Ctx, ReportInfo};
use super::ControlApi;
use crate::forward;
use crate::request_body::BodyCount;
use crate::service_control::report::ReportPart;
use crate::service_control::RequestRecord;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// One long call's reporting state, shared by the call (its [`ReportInfo`], then its
/// response body's completion) and its timer task, which holds it weakly: the task ends when
/// the call's last holder lets go, or at the final report.
pub(crate) struct StreamReporter {
    control: Arc<dyn ControlApi>,
    /// The call's report fields that do not change while it runs.
    template: RequestRecord,
    start: Instant,
    request: Option<Arc<BodyCount>>,
    /// Response body bytes sent to the client so far.
    response_bytes: AtomicU64,
    progress: Mutex<Progress>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

#[derive(Default)]
struct Progress {
    /// The final report was taken: no more intermediate ones.
    done: bool,
    /// An intermediate report was sent (the next ones are not the first).
    sent: bool,
    request_reported: u64,
    response_reported: u64,
}

impl StreamReporter {
    /// Starts the reports for `report`'s call when ESP v1 would make them: a streaming
    /// method, Service Control on, in the ESP dialect.
    pub(crate) fn start(
        pipeline: &super::Pipeline,
        report: &mut Option<ReportInfo>,
        ctx: &Ctx,
        backend_grpc: bool,
    ) {
        let st = &pipeline.state;
        if st.settings.dialect != crate::dialect::Dialect::Esp {
            return;
        }
        let (Some(r), Some(control)) = (report.as_mut(), st.control.as_ref()) else {
            return;
        };
        let Some(m) = r.method.as_ref() else { return };
        if !m.streaming || m.skip_service_control || !r.config.service_control {
            return;
        }
        let protocol = ctx.frontend_protocol();
        let template = RequestRecord {
            service_name: r.config.service.name.clone(),
            service_config_id: r.config.config_id.clone(),
            producer_project_id: r.config.service.producer_project_id.clone(),
            operation_name: Some(m.selector.clone()),
            api_name: m.api_name.clone(),
            api_version: m.api_version.clone(),
            api_key: r.api_key.clone(),
            api_key_valid: r.check.as_ref().is_some_and(|c| c.api_key_valid),
            consumer_project_number: r.check.as_ref().and_then(|c| c.consumer_project_number),
            check_network_failure: r.check_network_failure
                || r.check.as_ref().is_some_and(|c| c.network_failure),
            credential_id: r.auth.as_ref().map(|a| a.credential_id.clone()),
            http_method: ctx.method.as_str().to_string(),
            // Not in an intermediate report (it has no log entry): the URL, which may hold a
            // key, is not kept here.
            url: String::new(),
            response_code: 200,
            protocol: protocol.to_string(),
            backend_protocol: (backend_grpc && protocol != "grpc").then(|| "grpc".to_string()),
            caller_ip: Some(ctx.caller_ip),
            dialect: st.settings.dialect,
            api_key_state: r.api_key_state,
            ..RequestRecord::default()
        };
        let reporter = Arc::new(StreamReporter {
            control: control.clone(),
            template,
            start: ctx.start,
            request: ctx.body_counter.clone(),
            response_bytes: AtomicU64::new(0),
            progress: Mutex::new(Progress::default()),
            task: Mutex::new(None),
        });
        let interval = st.settings.intermediate_report_interval;
        // A zero period would make the timer panic; the settings never hold one.
        let interval = interval.max(Duration::from_millis(1));
        let task = tokio::spawn(tick(Arc::downgrade(&reporter), ctx.start, interval));
        if let Ok(mut t) = reporter.task.lock() {
            *t = Some(task.abort_handle());
        }
        r.stream = Some(reporter);
    }

    /// Response body bytes on their way to the client.
    pub(crate) fn sent(&self, n: usize) {
        self.response_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// One intermediate report if anything moved since the last; `false` once the final
    /// report was taken.
    fn intermediate(&self) -> bool {
        let Ok(mut p) = self.progress.lock() else {
            return false;
        };
        if p.done {
            return false;
        }
        let request = self.request.as_ref().map_or(0, |c| match c.received() {
            forward::BODY_UNREAD => 0,
            n => n,
        });
        let response = self.response_bytes.load(Ordering::Relaxed);
        if request == p.request_reported && response == p.response_reported {
            return true;
        }
        let mut record = self.template.clone();
        record.part = ReportPart::Intermediate { first: !p.sent };
        record.request_size = request.saturating_sub(p.request_reported);
        record.response_size = response.saturating_sub(p.response_reported);
        record.total_latency = self.start.elapsed();
        // The aggregator takes the record without waiting; the network call is its reporter's.
        self.control.report(record);
        p.sent = true;
        p.request_reported = request;
        p.response_reported = response;
        true
    }

    /// The call ended: what its final report is ([`ReportPart::Whole`] when no intermediate
    /// report was sent). No intermediate report follows.
    pub(crate) fn finish(&self) -> ReportPart {
        self.stop();
        let Ok(mut p) = self.progress.lock() else {
            return ReportPart::Whole;
        };
        p.done = true;
        if p.sent {
            ReportPart::Final {
                request_bytes_reported: p.request_reported,
                response_bytes_reported: p.response_reported,
            }
        } else {
            ReportPart::Whole
        }
    }

    fn stop(&self) {
        if let Some(t) = self.task.lock().ok().and_then(|mut t| t.take()) {
            t.abort();
        }
    }
}

impl Drop for StreamReporter {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn tick(reporter: Weak<StreamReporter>, start: Instant, interval: Duration) {
    let first = tokio::time::Instant::from_std(start) + interval;
    let mut ticks = tokio::time::interval_at(first, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(r) = reporter.upgrade() else { return };
        if !r.intermediate() {
            return;
        }
    }
}
