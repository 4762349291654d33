//! The Raft type configuration. openraft types stay inside `cluster/`.

use std::io::Cursor;

use crate::model::state::{Batch, CommandResult};

openraft::declare_raft_types!(
    /// mode's Raft types: batches of proposals in, their results out, u64 node ids, address-only nodes.
    pub TypeConfig:
        D = Batch,
        R = Vec<CommandResult>,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub(crate) type Raft = openraft::Raft<TypeConfig>;
pub(crate) type Entry = openraft::Entry<TypeConfig>;
pub(crate) type LogId = openraft::LogId<u64>;
pub(crate) type Vote = openraft::Vote<u64>;
pub(crate) type StoredMembership = openraft::StoredMembership<u64, openraft::BasicNode>;
pub(crate) type StorageError = openraft::StorageError<u64>;
