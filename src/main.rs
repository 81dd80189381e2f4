use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use log::{error, info};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use colo_blk::cli::Cli;
use colo_blk::storage::{BlockDevice, RawImage, RawImageOptions};
use colo_blk::vhost_user::{DeviceOptions, Server};

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .filter_level(cli.log_level.filter())
        .parse_default_env()
        .format_timestamp_micros()
        .init();
    if let Err(e) = cli.validate() {
        eprintln!("colo-blk: {e}");
        return ExitCode::from(2);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("colo-blk: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let image = RawImage::open(&RawImageOptions {
        path: cli.image.clone(),
        read_only: cli.read_only,
        direct: cli.direct,
        create_size: cli.size,
    })?;
    info!(
        "serving {} ({} bytes{}{})",
        cli.image.display(),
        image.capacity(),
        if cli.read_only { ", read-only" } else { "" },
        if cli.direct { ", O_DIRECT" } else { "" }
    );
    let disk: Arc<dyn BlockDevice> = Arc::new(image);
    let server = Server::new(
        &cli.socket,
        disk.clone(),
        DeviceOptions {
            num_queues: cli.num_queues,
            queue_size: cli.queue_size,
            serial: cli.serial.clone(),
            read_only: cli.read_only,
            logical_block_size: cli.logical_block_size,
        },
    );

    let control = server.control();
    let signal_disk = disk.clone();
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                info!("signal {sig}: shutting down");
                if control.stop() {
                    // No front-end: nothing in flight, sync and leave now.
                    if let Err(e) = signal_disk.flush() {
                        error!("flush failed: {e}");
                        std::process::exit(1);
                    }
                    std::process::exit(0);
                }
            }
        })?;

    server.run()?;
    disk.flush()?;
    info!("stopped");
    Ok(())
}
