//! Test support: a real headless Chromium driven through WebDriver (fantoccini).
//!
//! `scripts/chromium.sh` installs Debian's `chromium` and `chromium-driver` and starts
//! chromedriver on 127.0.0.1; `scripts/test.sh` exports its URL as
//! `STRIPE_MIRROR_TEST_WEBDRIVER`. Tests using this are `#[ignore]`d like the other
//! peer tests, and fail when the variable is missing.
//!
//! Self-contained (no `super::`), so it can be included either way:
//! `#[path = "common/browser.rs"] mod browser;` from a file in `tests/`, or
//! `pub mod browser;` in `tests/common/mod.rs` (then `common::browser`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use fantoccini::{Client, ClientBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

/// Where the Debian package puts Chromium (a shell wrapper around /usr/lib/chromium).
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// A new session in a fresh headless Chromium with its own empty profile. Close it with
/// `client.close().await` at the end of the test (that also ends the browser).
pub async fn chromium() -> Client {
    let webdriver = match std::env::var("STRIPE_MIRROR_TEST_WEBDRIVER") {
        Ok(value) if !value.is_empty() => value,
        _ => panic!("STRIPE_MIRROR_TEST_WEBDRIVER is not set: run scripts/test.sh"),
    };
    let profile = fresh_profile();
    let Value::Object(capabilities) = capabilities(&profile) else {
        unreachable!()
    };
    // chromedriver speaks plain HTTP on loopback: no TLS connector needed.
    ClientBuilder::new(HttpConnector::new())
        .capabilities(capabilities)
        .connect(&webdriver)
        .await
        .unwrap_or_else(|e| {
            panic!("start headless Chromium through chromedriver at {webdriver}: {e}")
        })
}

/// The WebDriver capabilities [`chromium`] asks for: headless Chromium running as root
/// in a container without a sandbox, GPU or large /dev/shm, with no background traffic.
pub fn capabilities(profile: &Path) -> Value {
    json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ],
        },
    })
}

/// A screenshot of the current page (the viewport) as a PNG at `path`, creating its
/// folder.
pub async fn screenshot(client: &Client, path: impl AsRef<Path>) {
    let path = path.as_ref();
    let png = client.screenshot().await.expect("take a screenshot");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    }
    std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// `target/screenshots/NAME` (in the build's target folder, wherever it is).
pub fn screenshot_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR is target/tmp")
        .join("screenshots")
        .join(name)
}

/// A new empty profile folder under the system temp folder. The client cannot own it
/// (chromium() returns a bare `Client`), so it is kept, and each call first removes the
/// profiles no Chromium holds (no live `SingletonLock`) that are idle for 10 minutes.
fn fresh_profile() -> PathBuf {
    let root = std::env::temp_dir().join("stripe-mirror-chromium");
    std::fs::create_dir_all(&root).unwrap_or_else(|e| panic!("create {}: {e}", root.display()));
    for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        let dir = entry.path();
        let idle = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > Duration::from_secs(600));
        if idle && !held_by_live_chromium(&dir) {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    tempfile::Builder::new()
        .prefix("profile-")
        .tempdir_in(&root)
        .expect("create a Chromium profile folder")
        .keep()
}

/// Chromium's `SingletonLock` is a symlink to `HOST-PID` while it runs.
fn held_by_live_chromium(profile: &Path) -> bool {
    let Ok(target) = std::fs::read_link(profile.join("SingletonLock")) else {
        return false;
    };
    let target = target.to_string_lossy().into_owned();
    match target
        .rsplit_once('-')
        .and_then(|(_, pid)| pid.parse::<u32>().ok())
    {
        Some(pid) => Path::new(&format!("/proc/{pid}")).exists(),
        None => true,
    }
}
