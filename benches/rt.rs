//! custodian::rt against its peers.
//!
//! - `defer`: a guard dropped without `close`, its cleanup handed to the reaper and run
//!   to completion, vs `TaskTracker::spawn` (tokio::spawn + track_future) of the same
//!   future, vs tokio-util's `DropGuard`/`CancellationToken` pattern (a task per
//!   resource waiting for cancellation), vs async-dropper (blocks in `Drop` until the
//!   cleanup finished). Multi-thread runtime, 2 workers. One element = one resource
//!   created, dropped and cleaned up.
//! - `close`: `AsyncGuard::close(AsyncGuard::new(v, f)).await` vs `f(v).await`, on a current-thread
//!   runtime, for a cleanup that is ready at once, one that yields once, and a real one (a
//!   goodbye line written to a loopback TCP peer).
//!
//! Run: `cargo bench --all-features --bench rt -- --warm-up-time 1 --measurement-time 3`.

use std::future::Future;
use std::hint::black_box;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use custodian::rt::AsyncGuard;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::{Builder, Runtime};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Counts finished cleanups and wakes the driver when the last one of a run is done.
#[derive(Default)]
struct Done {
    count: AtomicU64,
    target: AtomicU64,
    notify: Notify,
}

impl Done {
    fn start(&self, target: u64) {
        self.count.store(0, Ordering::SeqCst);
        self.target.store(target, Ordering::SeqCst);
    }

    fn one(&self) {
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.target.load(Ordering::Acquire) {
            self.notify.notify_one();
        }
    }
}

/// The cleanup every contender runs: count one (and wake the driver after the last).
async fn cleanup(done: Arc<Done>) -> io::Result<()> {
    done.one();
    Ok(())
}

fn multi_thread() -> Runtime {
    Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `iters` resources through `each` inside a task on a worker (as a server's
/// handlers would), and waits until all their cleanups finished.
fn drive<F>(rt: &Runtime, done: &Arc<Done>, iters: u64, each: F) -> Duration
where
    F: Fn(&Arc<Done>) + Send + 'static,
{
    let done = Arc::clone(done);
    rt.block_on(async move {
        done.start(iters);
        let start = Instant::now();
        let driver = tokio::spawn({
            let done = Arc::clone(&done);
            async move {
                let finished = done.notify.notified();
                for _ in 0..iters {
                    each(&done);
                }
                finished.await;
            }
        });
        driver.await.unwrap();
        start.elapsed()
    })
}

/// async-dropper needs `Default`: it swaps a default value in to move the real one out.
#[derive(Default)]
struct Dropper {
    done: Option<Arc<Done>>,
}

/// async-dropper's trait is written with `async_trait`; this is what it expands to.
impl async_dropper::AsyncDrop for Dropper {
    fn async_drop<'life0, 'async_trait>(
        &'life0 mut self,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            if let Some(done) = self.done.take() {
                let _ = cleanup(done).await;
            }
        })
    }
}

fn defer(c: &mut Criterion) {
    let rt = multi_thread();
    let done = Arc::new(Done::default());
    let mut group = c.benchmark_group("defer");
    group.throughput(Throughput::Elements(1));

    group.bench_function("custodian AsyncGuard dropped", |b| {
        b.iter_custom(|iters| {
            drive(&rt, &done, iters, |done| {
                drop(AsyncGuard::new(Arc::clone(done), cleanup));
            })
        })
    });

    let tracker = TaskTracker::new();
    group.bench_function("tokio spawn + TaskTracker::track_future", |b| {
        b.iter_custom(|iters| {
            let tracker = tracker.clone();
            drive(&rt, &done, iters, move |done| {
                drop(tracker.spawn(cleanup(Arc::clone(done))));
            })
        })
    });

    group.bench_function("tokio-util DropGuard + CancellationToken task", |b| {
        b.iter_custom(|iters| {
            let tracker = tracker.clone();
            drive(&rt, &done, iters, move |done| {
                let token = CancellationToken::new();
                let waiting = token.clone();
                let done = Arc::clone(done);
                drop(tracker.spawn(async move {
                    waiting.cancelled().await;
                    cleanup(done).await
                }));
                drop(token.drop_guard());
            })
        })
    });

    group.bench_function("async-dropper AsyncDropper dropped", |b| {
        b.iter_custom(|iters| {
            drive(&rt, &done, iters, |done| {
                drop(async_dropper::AsyncDropper::new(Dropper {
                    done: Some(Arc::clone(done)),
                }));
            })
        })
    });
    group.finish();
}

async fn ready(n: u64) -> io::Result<()> {
    black_box(n);
    Ok(())
}

async fn yields(n: u64) -> io::Result<()> {
    tokio::task::yield_now().await;
    black_box(n);
    Ok(())
}

fn close(c: &mut Criterion) {
    let rt = Builder::new_current_thread().enable_all().build().unwrap();
    let mut group = c.benchmark_group("close");
    group.throughput(Throughput::Elements(1));
    group.bench_function("direct ready cleanup", |b| {
        b.iter(|| rt.block_on(async { ready(black_box(1)).await.unwrap() }))
    });
    group.bench_function("custodian close, ready cleanup", |b| {
        b.iter(|| {
            rt.block_on(async {
                AsyncGuard::close(AsyncGuard::new(black_box(1), ready))
                    .await
                    .unwrap()
            })
        })
    });
    group.bench_function("direct yielding cleanup", |b| {
        b.iter(|| rt.block_on(async { yields(black_box(1)).await.unwrap() }))
    });
    group.bench_function("custodian close, yielding cleanup", |b| {
        b.iter(|| {
            rt.block_on(async {
                AsyncGuard::close(AsyncGuard::new(black_box(1), yields))
                    .await
                    .unwrap()
            })
        })
    });

    // A real cleanup: a goodbye line on a loopback TCP connection (a peer task drains it).
    let client = rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0; 1 << 16];
            while server.read(&mut buf).await.unwrap_or(0) > 0 {}
        });
        Arc::new(client)
    });
    group.bench_function("direct goodbye over loopback TCP", |b| {
        b.iter(|| rt.block_on(async { goodbye(Arc::clone(&client)).await.unwrap() }))
    });
    group.bench_function("custodian close, goodbye over loopback TCP", |b| {
        b.iter(|| {
            rt.block_on(async {
                AsyncGuard::close(AsyncGuard::new(Arc::clone(&client), goodbye))
                    .await
                    .unwrap()
            })
        })
    });
    group.finish();
}

async fn goodbye(stream: Arc<TcpStream>) -> io::Result<()> {
    loop {
        stream.writable().await?;
        match stream.try_write(b"goodbye\n") {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

criterion_group!(benches, defer, close);
criterion_main!(benches);
