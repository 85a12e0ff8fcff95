//! Integration tests: the real server on a random port, exercised over HTTP as clients see it.

mod helpers;

mod audit;
mod auth;
mod bad_input;
mod cds;
mod client;
mod conformance;
mod durability;
mod ehr_double;
mod examples;
mod extract;
mod fuzz_regressions;
mod ops;
mod pa;
mod packets;
mod pas;
mod pas_subscriptions;
mod phi;
mod pipeline;
mod rest;
mod search;
mod security;
mod sync;
mod sync_faults;
mod synthea;
mod transaction;
mod webhooks;
