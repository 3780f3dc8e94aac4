//! An untraced request costs no allocation for tracing: the sampling decision (context
//! headers parsed by each dialect's rules, the sampler consulted) is counted with a global
//! allocator wrapper, per thread (the test harness runs other threads that do allocate).
//! The pipeline's other tracing touch points are `Option` checks on `Ctx::trace`. ESPv2 gives
//! an untraced request a trace ID too (the incoming one, else a random one): that costs no
//! allocation either; writing its outgoing context headers costs two in all, whatever their
//! number: one buffer for every value, and its shared count (measured below).

use base64::Engine as _;
use http::{HeaderMap, HeaderValue};
use portico_proxy::dialect::Dialect;
use portico_proxy::trace::{context, export::Queue, Started, TraceSettings, Tracer};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn header_sets() -> Vec<HeaderMap> {
    let bin = |sampled: u8| {
        let mut b = vec![0u8, 0];
        b.extend_from_slice(&[7u8; 16]);
        b.push(1);
        b.extend_from_slice(&9u64.to_be_bytes());
        b.extend_from_slice(&[2, sampled]);
        base64::engine::general_purpose::STANDARD.encode(b)
    };
    let mut sets = vec![HeaderMap::new()];
    for (name, value) in [
        (
            &context::X_CLOUD_TRACE_CONTEXT,
            "0123456789abcdef0123456789abcdef/5;o=0".to_string(),
        ),
        (&context::X_CLOUD_TRACE_CONTEXT, "garbage;o=1".to_string()),
        (
            &context::X_CLOUD_TRACE_CONTEXT,
            format!("{}/1;o=1", "f".repeat(4000)),
        ),
        (
            &context::TRACEPARENT,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00".to_string(),
        ),
        (&context::TRACEPARENT, "00-bad".to_string()),
        (&context::GRPC_TRACE_BIN, bin(0)),
        (&context::GRPC_TRACE_BIN, "!!!not base64!!!".to_string()),
    ] {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(&value).expect("header value"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        sets.push(h);
    }
    sets
}

fn tracers() -> Vec<Arc<Tracer>> {
    let mut esp = TraceSettings::esp();
    // The slot is taken below, then auto-sampling cannot fire again for an hour.
    esp.auto_interval = Some(std::time::Duration::from_secs(3600));
    let mut esp_off = TraceSettings::esp();
    esp_off.auto_interval = None;
    let mut v2_zero = TraceSettings::espv2();
    v2_zero.sample_rate = 0.0;
    let mut v2_tiny = TraceSettings::espv2();
    // Random draws, almost never sampled.
    v2_tiny.sample_rate = 1e-12;
    let mut disabled = TraceSettings::espv2();
    disabled.disabled = true;
    let mut all = TraceSettings::espv2();
    all.incoming = vec![
        context::Format::GrpcTraceBin,
        context::Format::CloudTrace,
        context::Format::TraceParent,
    ];
    all.sample_rate = 0.0;
    [
        (Dialect::Esp, esp),
        (Dialect::Esp, esp_off),
        (Dialect::EspV2, v2_zero),
        (Dialect::EspV2, v2_tiny),
        (Dialect::EspV2, disabled),
        (Dialect::EspV2, all),
    ]
    .into_iter()
    .map(|(d, s)| Arc::new(Tracer::new(d, s, Queue::new(4).0)))
    .collect()
}

#[test]
fn an_untraced_request_allocates_nothing_for_tracing() {
    let sets = header_sets();
    let tracers = tracers();
    // Warm up (thread-local random generator, ESP's first auto-sampled request, which takes
    // the slot and is traced).
    for t in &tracers {
        for h in &sets {
            drop(std::hint::black_box(t.start(h)));
        }
    }
    let before = ALLOCATIONS.with(Cell::get);
    let (mut traced, mut unsampled) = (0, 0);
    for _ in 0..200 {
        for t in &tracers {
            for h in &sets {
                match std::hint::black_box(t.begin(h)) {
                    Started::Traced(_) => traced += 1,
                    Started::Unsampled(id) => {
                        assert_ne!(std::hint::black_box(id), [0; 16]);
                        unsampled += 1;
                    }
                    Started::Off => {}
                }
            }
        }
    }
    let after = ALLOCATIONS.with(Cell::get);
    assert_eq!(traced, 0, "none of these requests is traced");
    // The three ESPv2 tracers that are not disabled, every header set.
    assert_eq!(
        unsampled,
        200 * 3 * sets.len(),
        "ESPv2's requests have a trace ID"
    );
    assert_eq!(after - before, 0, "allocations on the untraced path");
}

#[test]
fn espv2_untraced_outgoing_headers_cost_two_allocations_in_all() {
    let mut all = TraceSettings::espv2();
    all.outgoing = vec![
        context::Format::TraceParent,
        context::Format::CloudTrace,
        context::Format::GrpcTraceBin,
    ];
    all.sample_rate = 0.0;
    let t = Tracer::new(Dialect::EspV2, all, Queue::new(4).0);
    // A request's headers, with room (as a request parsed by hyper has).
    let mut h = HeaderMap::with_capacity(32);
    h.insert("content-type", HeaderValue::from_static("application/json"));
    let id = [7u8; 16];
    t.write_outgoing(&id, 1, false, &mut h);
    let before = ALLOCATIONS.with(Cell::get);
    for span in 2..102u64 {
        t.write_outgoing(&id, span, false, std::hint::black_box(&mut h));
    }
    let per_request = (ALLOCATIONS.with(Cell::get) - before) / 100;
    assert_eq!(
        per_request, 2,
        "three values: one buffer and its shared count"
    );
    assert_eq!(
        h.get(&context::TRACEPARENT).and_then(|v| v.to_str().ok()),
        Some(format!("00-{}-{:016x}-00", "07".repeat(16), 101).as_str())
    );
    assert_eq!(
        h.get(&context::X_CLOUD_TRACE_CONTEXT)
            .and_then(|v| v.to_str().ok()),
        Some(format!("{}/101;o=0", "07".repeat(16)).as_str())
    );
    assert!(h.contains_key(&context::GRPC_TRACE_BIN));
    // One header: the same two.
    let mut one = TraceSettings::espv2();
    one.outgoing = vec![context::Format::TraceParent];
    let t = Tracer::new(Dialect::EspV2, one, Queue::new(4).0);
    let before = ALLOCATIONS.with(Cell::get);
    for span in 2..102u64 {
        t.write_outgoing(&id, span, false, std::hint::black_box(&mut h));
    }
    assert_eq!((ALLOCATIONS.with(Cell::get) - before) / 100, 2);
}

#[test]
fn a_traced_request_does_allocate() {
    // The counter works: a forced trace allocates its recorder.
    let t = Arc::new(Tracer::new(
        Dialect::Esp,
        TraceSettings::esp(),
        Queue::new(4).0,
    ));
    let mut h = HeaderMap::new();
    h.insert(
        &context::X_CLOUD_TRACE_CONTEXT,
        HeaderValue::from_static("0123456789abcdef0123456789abcdef/5;o=1"),
    );
    let before = ALLOCATIONS.with(Cell::get);
    let r = t.start(&h);
    assert!(r.is_some());
    assert!(ALLOCATIONS.with(Cell::get) > before);
}
