//! The subcommands: thin adapters from parsed flags to SDK calls (data),
//! admin HTTP calls (`node`) and output.

use std::io::Write;

use anyhow::Context;
use clap::CommandFactory;
use futures::StreamExt;
use stemedb_client::{Assertion, ClientOptions, HistoryQuery, Op, Query};

use crate::cli::{Cli, Command, Output, WalCommand, WriteArgs};
use crate::connect::grpc as connect;
use crate::exit::UsageError;
use crate::value::{parse_value, ValueType};
use crate::{load, node, output};

fn typed_value(raw: &str, ty: ValueType) -> anyhow::Result<stemedb_client::Value> {
    parse_value(raw, ty).map_err(|e| UsageError(e).into())
}

/// Runs every subcommand except `bench`.
pub async fn run(cli: &Cli) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let format = cli.output;
    match &cli.command {
        Command::Assert(w) => write(cli, w, false, &mut out).await,
        Command::Retract(w) => write(cli, w, true, &mut out).await,
        Command::Get { entity, as_of } => {
            let client = connect(cli, ClientOptions::default()).await?;
            let view = client
                .get(entity, *as_of)
                .await
                .with_context(|| format!("get {entity}"))?;
            output::entity_view(&mut out, format, &view)?;
            Ok(())
        }
        Command::Query {
            attribute,
            value,
            value_type,
            source,
            as_of,
            limit,
        } => {
            let mut q = Query::attribute(attribute.as_str());
            if let Some(raw) = value {
                q = q.value(typed_value(raw, *value_type)?);
            }
            if let Some(s) = source {
                q = q.source(s.as_str());
            }
            if let Some(tx) = as_of {
                q = q.as_of(*tx);
            }
            if let Some(n) = limit {
                // No point fetching pages of facts we will not print.
                q = q.page_size(u32::try_from(*n).unwrap_or(u32::MAX).clamp(1, 1000));
            }
            let client = connect(cli, ClientOptions::default()).await?;
            let facts = client.query(q).take(limit.unwrap_or(usize::MAX));
            print_facts(facts, format, &mut out)
                .await
                .with_context(|| format!("query {attribute}"))
        }
        Command::History {
            entity,
            attribute,
            since,
            until,
        } => {
            let mut h = HistoryQuery::entity(entity.as_str());
            if let Some(a) = attribute {
                h = h.attribute(a.as_str());
            }
            if let Some(tx) = since {
                h = h.since(*tx);
            }
            if let Some(tx) = until {
                h = h.until(*tx);
            }
            let client = connect(cli, ClientOptions::default()).await?;
            print_facts(client.history(h), format, &mut out)
                .await
                .with_context(|| format!("history {entity}"))
        }
        Command::Watch { from, count } => {
            let client = connect(cli, ClientOptions::default()).await?;
            let events = client.watch(*from).await.context("watch")?;
            let mut events = std::pin::pin!(events.take(count.map_or(usize::MAX, |n| n as usize)));
            while let Some(event) = events.next().await {
                output::tx_event(&mut out, format, &event.context("watch")?)?;
                out.flush()?;
            }
            Ok(())
        }
        Command::Drain { wait, wait_timeout } => {
            node::drain(cli, *wait, *wait_timeout, &mut out).await
        }
        Command::Undrain => node::undrain(cli, &mut out).await,
        Command::RateLimit(c) => node::rate_limit(cli, c, &mut out).await,
        Command::Status => node::status(cli, &mut out).await,
        Command::Wal(WalCommand::Status) => node::wal_status(cli, &mut out).await,
        Command::Wal(WalCommand::Archive(a)) => crate::backup::wal_archive(a, &mut out).await,
        Command::Wal(WalCommand::ArchiveStatus(a)) => {
            crate::backup::wal_archive_status(cli, a, &mut out)
        }
        Command::Backup(c) => crate::backup::backup(cli, c, &mut out).await,
        Command::Restore(a) => crate::backup::restore(cli, a, &mut out).await,
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "stemectl", &mut out);
            Ok(())
        }
        Command::Bench(_) => unreachable!("bench is dispatched by main"),
    }
}

async fn write(
    cli: &Cli,
    w: &WriteArgs,
    retract: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    if let Some(c) = w.confidence {
        if !(0.0..=1.0).contains(&c) {
            return Err(UsageError(format!("--confidence {c} is outside [0, 1]")).into());
        }
    }
    if let Some(path) = &w.file {
        let client = connect(cli, ClientOptions::default()).await?;
        let defaults = load::Defaults {
            op: if retract { Op::Retract } else { Op::Assert },
            source: w.source.clone(),
        };
        return load::run(
            &client,
            path,
            w.batch.unwrap_or(load::BATCH_DEFAULT) as usize,
            &defaults,
            cli.output,
            out,
        )
        .await;
    }
    if w.batch.is_some() {
        // clap's `requires` does not catch this one, next to the
        // positionals' `required_unless_present`.
        return Err(UsageError("--batch applies only with --file".into()).into());
    }
    // clap requires all three positionals unless --file is given.
    let (Some(entity), Some(attribute), Some(raw)) = (&w.entity, &w.attribute, &w.value) else {
        return Err(UsageError("ENTITY ATTRIBUTE VALUE or --file is required".into()).into());
    };
    let value = typed_value(raw, w.value_type)?;
    let mut a = if retract {
        Assertion::retract(entity.as_str(), attribute.as_str(), value)
    } else {
        Assertion::assert(entity.as_str(), attribute.as_str(), value)
    }
    .source(w.source.as_str());
    a.confidence = w.confidence;
    let client = connect(cli, ClientOptions::default()).await?;
    let receipt = match &w.idempotency_key {
        Some(key) => client.transact_with_key(vec![a], key.as_str()).await,
        None => client.transact(vec![a]).await,
    }
    .context("transact")?;
    output::receipt(out, cli.output, &receipt)?;
    Ok(())
}

async fn print_facts(
    facts: impl futures::Stream<Item = Result<stemedb_client::Fact, stemedb_client::Error>>,
    format: Output,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut facts = std::pin::pin!(facts);
    let mut printed = 0u64;
    while let Some(fact) = facts.next().await {
        output::streamed_fact(out, format, &fact?)?;
        printed += 1;
    }
    if format == Output::Table && printed == 0 {
        writeln!(out, "(no facts)")?;
    }
    Ok(())
}
