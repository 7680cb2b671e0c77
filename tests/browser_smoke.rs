//! The browser harness works: a page served in-process is opened in a real headless
//! Chromium (through chromedriver), its inline script runs on a click, and a screenshot
//! is written to target/screenshots/smoke.png.

#[path = "common/browser.rs"]
mod browser;

use axum::{Router, response::Html, routing::get};
use fantoccini::Locator;

const PAGE: &str = r#"<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>stripe-mirror browser smoke test</title></head>
<body style="font: 24px sans-serif; margin: 40px">
  <h1>Browser smoke test</h1>
  <p id="status">Not clicked yet</p>
  <button id="go" onclick="document.getElementById('status').textContent = 'Clicked by Chromium'">
    Click me
  </button>
</body>
</html>"#;

#[tokio::test]
#[ignore = "needs chromedriver: run scripts/test.sh"]
async fn chromium_runs_inline_script_on_click() {
    let app = Router::new().route("/", get(|| async { Html(PAGE) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let client = browser::chromium().await;
    client.goto(&format!("http://{addr}/")).await.unwrap();
    assert_eq!(
        client.title().await.unwrap(),
        "stripe-mirror browser smoke test"
    );
    let status = client.find(Locator::Id("status")).await.unwrap();
    assert_eq!(status.text().await.unwrap(), "Not clicked yet");

    client
        .find(Locator::Id("go"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert_eq!(status.text().await.unwrap(), "Clicked by Chromium");

    browser::screenshot(&client, browser::screenshot_path("smoke.png")).await;
    client.close().await.unwrap();
}
