// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The test importer (see `main.rs`): [`proto`] (the queue protocol, mirroring
//! `importer_proto.h`), [`importer`] (the requests, over the export socket; no vhost
//! types), [`backend`] (the vhost-user back end).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod backend;
pub mod importer;
pub mod proto;
