//! `PathMatcher::lookup` must not allocate: counted with a global allocator wrapper, per thread
//! (the test harness runs other threads that do allocate).

use portico_config::PathMatcherBuilder;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

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

#[test]
fn lookup_does_not_allocate() {
    let mut b = PathMatcherBuilder::new();
    b.register("GET", "/shelves", 1).unwrap();
    b.register("GET", "/shelves/{shelf}/books/{book}", 2)
        .unwrap();
    b.register("POST", "/v1/{name=operations/**}:cancel", 3)
        .unwrap();
    b.register("*", "/**", 4).unwrap();
    b.register("GET", "/c/*/d/e", 5).unwrap();
    let m = b.build();
    let targets = [
        ("GET", "/shelves?key=abc"),
        ("HEAD", "/shelves/1/books/2/"),
        ("POST", "/v1/operations/a/b:cancel"),
        ("GET", "/c/x/d/e"),
        ("DELETE", "/nothing/registered/here"),
        ("GET", "/foo/other:verb"),
        ("GET", "/"),
    ];
    // Warm up thread-locals and lazy statics outside the counted region.
    for (method, target) in targets {
        std::hint::black_box(m.lookup(method, target));
    }
    let before = ALLOCATIONS.with(Cell::get);
    let mut found = 0;
    for _ in 0..100 {
        for (method, target) in targets {
            if std::hint::black_box(m.lookup(method, target)).is_some() {
                found += 1;
            }
        }
    }
    let after = ALLOCATIONS.with(Cell::get);
    assert_eq!(
        found, 700,
        "every target matches something (the /** catch-all at worst)"
    );
    assert_eq!(after - before, 0, "lookup allocated");
    // The counter works: bindings do allocate.
    let _ = m.lookup_with_bindings("GET", "/shelves/1/books/2");
    assert!(ALLOCATIONS.with(Cell::get) > after);
}
