//! Writes two facts, reads them back every way the API allows.
//!
//! Run against a node with:
//! `STEMEDB_URL=http://127.0.0.1:18181 cargo run -p stemedb-client --example quickstart`

use futures::TryStreamExt;
use stemedb_client::{Assertion, Client, HistoryQuery, Query};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("STEMEDB_URL").unwrap_or_else(|_| "http://127.0.0.1:18181".into());
    let client = Client::connect(url).await?;

    let entity = format!("user:{}", std::process::id());
    let receipt = client
        .transact(vec![
            Assertion::assert(&entity, "name", "Ada Lovelace")
                .source("quickstart")
                .confidence(0.95),
            Assertion::assert(&entity, "born", 1815i64).source("quickstart"),
        ])
        .await?;
    println!(
        "committed tx {} (deduplicated: {})",
        receipt.tx, receipt.deduplicated
    );

    let view = client.get(&entity, None).await?;
    println!("get {} as of tx {}:", view.entity, view.basis_tx);
    for fact in &view.facts {
        println!(
            "  {} = {:?} (source {:?}, tx {})",
            fact.attribute, fact.value, fact.source, fact.tx
        );
    }

    let named: Vec<_> = client
        .query(Query::attribute("name").value("Ada Lovelace"))
        .try_collect()
        .await?;
    println!("query name = \"Ada Lovelace\": {} fact(s)", named.len());

    client
        .transact(vec![
            Assertion::retract(&entity, "born", 1815i64).source("quickstart")
        ])
        .await?;
    let history: Vec<_> = client
        .history(HistoryQuery::entity(&entity))
        .try_collect()
        .await?;
    println!("history of {entity}:");
    for fact in &history {
        println!(
            "  tx {} {:?} {} = {:?}",
            fact.tx, fact.op, fact.attribute, fact.value
        );
    }

    let before = client.get(&entity, Some(receipt.tx)).await?;
    println!(
        "as of tx {}: {} fact(s); now: {} fact(s)",
        receipt.tx,
        before.facts.len(),
        client.get(&entity, None).await?.facts.len()
    );
    Ok(())
}
