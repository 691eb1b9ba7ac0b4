//! The SSD cache: on-disk layout and index ([`store`]), chunk maps ([`chunks`]) and the live,
//! partially filled copies that readers and the background worker share ([`file`]).

pub mod adopt;
pub mod chunks;
pub mod entries;
pub mod file;
pub mod store;

pub use chunks::ChunkMap;
pub use entries::{Aged, Totals};
pub use file::{CacheFile, FetchError, Rest};
pub use store::{EntryRecord, Perms, Store, StoreError};
pub mod live;
pub mod space;
pub use live::{Cache, Found};
pub use space::{TrimReport, TrimRequest, Usage};
