//! A store channel over the 9P server double (`vstorage::p9::server`),
//! serving a real host directory: the platform's virtio-9p device, in
//! process. The test keeps a handle on the server to inject faults and
//! count requests.

use alloc::rc::Rc;
use alloc::string::String;
use core::cell::RefCell;
use hvcore::host::{StoreChannel, StoreIoError};
use vstorage::p9::server::DirServer;
use vstorage::p9::Transport;

/// The channel; `server` is shared with the test.
pub struct DirChannel {
    pub tag: String,
    pub server: Rc<RefCell<DirServer>>,
}

impl DirChannel {
    /// Serves `dir` under mount tag `tag` with messages of at most
    /// `msize` bytes.
    pub fn new(tag: &str, dir: &std::path::Path, msize: u32) -> Self {
        DirChannel {
            tag: tag.into(),
            server: Rc::new(RefCell::new(DirServer::new(dir, msize))),
        }
    }
}

impl StoreChannel for DirChannel {
    fn tag(&self) -> &str {
        &self.tag
    }
    fn max_message_bytes(&self) -> u32 {
        self.server.borrow().max_message_bytes()
    }
    fn transact(&mut self, request: &[u8], reply: &mut [u8]) -> Result<usize, StoreIoError> {
        self.server
            .borrow_mut()
            .transact(request, reply)
            .map_err(|_| StoreIoError::Device("server double failed"))
    }
}
