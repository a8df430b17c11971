//! Property tests of the nested page table and the dirty log against
//! simple models (a `BTreeMap` of guest frames, a `BTreeSet` of written
//! frames), over both entry formats and the recording frame store of
//! [`crate::testing`].

mod dirty;
mod npt;
