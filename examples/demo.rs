//! `cargo xtask demo`: create a machine, run commands in it, stream a
//! command's output live, delete it, and show how long each phase took.
//!
//! With `SMOL_DEMO_IMAGE` set to an image (`alpine:3.20`, a registry on
//! 127.0.0.1, `oci-layout:DIR`, `docker-archive:FILE`), the demo also
//! pulls it into the machine with a progress bar and runs
//! `echo hello from IMAGE` in a container of it. Unset, it pulls nothing
//! (our machines have no Docker Hub).

use std::io::Write;
use std::time::Instant;

use futures::StreamExt;
use smol::{ExecEvent, Machine, MachineConfig};

// The CLI's progress bar; the demo uses only part of it.
#[allow(dead_code)]
#[path = "../src/bin/smol/progress.rs"]
mod progress;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run().await {
        eprintln!("demo failed: {e}");
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            eprintln!("  caused by: {c}");
            cause = c.source();
        }
        std::process::exit(1);
    }
}

async fn run() -> smol::Result<()> {
    if smol::is_kvm_pvm_host() {
        println!("note: /dev/kvm is kvm_pvm (nested, software) here: the first boot of a machine shape takes about a minute instead of milliseconds; later creates restore its snapshot");
    }
    let t = Instant::now();
    println!("creating a machine...");
    // Say something while a first boot takes its minute.
    let ticker = tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(10)).await;
            println!("  still booting ({:.0?} so far)", t.elapsed());
        }
    });
    let created = Machine::create(MachineConfig::default()).await;
    ticker.abort();
    let m = created?;
    println!("machine {} running after {:.2?}", m.name(), t.elapsed());
    if let Some(tm) = m.boot_timings().await? {
        println!(
            "  {}",
            if tm.restored {
                "restored from this host's booted snapshot of the shape (a warm create)"
            } else {
                "booted (the first machine of its shape on this host; it is snapshotted for the next)"
            }
        );
        println!("  prepare (record, disk)       {:>10.2?}", tm.prepare);
        println!("  vm set-up on the host        {:>10.2?}", tm.vm_setup);
        println!(
            "    kvm {:.2?}, memory {:.2?}, kernel load {:.2?}, devices {:.2?}, vcpus {:.2?}",
            tm.vmm.kvm, tm.vmm.memory, tm.vmm.kernel_load, tm.vmm.devices, tm.vmm.vcpus
        );
        println!("  until the agent answers      {:>10.2?}", tm.agent_ready);
        println!("  total                        {:>10.2?}", tm.total);
    }

    for argv in [&["uname", "-a"][..], &["ls", "-la", "/"][..]] {
        let t = Instant::now();
        let r = m.exec(argv).await?;
        println!(
            "\n$ {}   (exit {}, {:.2?})",
            argv.join(" "),
            r.exit_code,
            t.elapsed()
        );
        print!("{}", r.stdout_lossy());
        eprint!("{}", r.stderr_lossy());
    }

    let script = "for i in 1 2 3; do echo $i; sleep 1; done";
    println!("\n$ sh -c '{script}'   (streamed live)");
    let t = Instant::now();
    let mut s = m.exec_stream(["sh", "-c", script]).await?;
    while let Some(ev) = s.next().await {
        match ev? {
            ExecEvent::Stdout(b) => {
                print!(
                    "[{:>6.2}s] {}",
                    t.elapsed().as_secs_f64(),
                    String::from_utf8_lossy(&b)
                );
                let _ = std::io::stdout().flush();
            }
            ExecEvent::Stderr(b) => eprint!("{}", String::from_utf8_lossy(&b)),
            ExecEvent::Exit(code) => println!("[{:>6.2}s] exit {code}", t.elapsed().as_secs_f64()),
            ExecEvent::Error(e) => println!("error: {e}"),
        }
    }

    if let Some(image) = std::env::var("SMOL_DEMO_IMAGE")
        .ok()
        .filter(|i| !i.is_empty())
    {
        pull_and_run(&m, &image).await?;
    }

    let t = Instant::now();
    m.delete().await?;
    println!("\nmachine {} deleted in {:.2?}", m.name(), t.elapsed());
    Ok(())
}

/// Pulls `image` into the machine with a progress bar and runs a command
/// in it.
async fn pull_and_run(m: &Machine, image: &str) -> smol::Result<()> {
    println!("\npulling {image} (SMOL_DEMO_IMAGE)");
    let t = Instant::now();
    let bar = progress::PullBar::new(image);
    let pulled = m.pull_image_with_progress(image, bar.callback()).await;
    bar.finish();
    let info = pulled?;
    println!(
        "pulled {} ({}, {}) in {:.2?}",
        info.reference,
        progress::layers_text(info.layers.len()),
        indicatif::HumanBytes(info.size),
        t.elapsed()
    );
    let greeting = format!("hello from {image}");
    let t = Instant::now();
    let r = m.run(&info.digest, ["echo", greeting.as_str()]).await?;
    println!(
        "\n$ echo {greeting}   (in a container of the image; exit {}, {:.2?})",
        r.exit_code,
        t.elapsed()
    );
    print!("{}", r.stdout_lossy());
    eprint!("{}", r.stderr_lossy());
    Ok(())
}
