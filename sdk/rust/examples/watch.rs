//! Prints every transaction from `FROM_TX` (default: the beginning), then
//! live ones as they commit. The stream reopens itself across node restarts.
//!
//! `STEMEDB_URL=http://127.0.0.1:18181 FROM_TX=1 cargo run -p stemedb-client --example watch`

use futures::StreamExt;
use stemedb_client::Client;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("STEMEDB_URL").unwrap_or_else(|_| "http://127.0.0.1:18181".into());
    let from_tx: u64 = std::env::var("FROM_TX")
        .ok()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1);
    let client = Client::connect(url).await?;

    let events = client.watch(from_tx).await?;
    futures::pin_mut!(events);
    while let Some(event) = events.next().await {
        let event = event?;
        println!(
            "tx {} at {:?}: {} fact(s)",
            event.tx,
            event.recorded_at,
            event.facts.len()
        );
        for fact in &event.facts {
            println!(
                "  {:?} {} {} = {:?}",
                fact.op, fact.entity, fact.attribute, fact.value
            );
        }
    }
    Ok(())
}
