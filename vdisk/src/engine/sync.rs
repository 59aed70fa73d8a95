use std::os::fd::RawFd;

use super::{blocking_op, Completion, Op};

/// Performs each operation with a blocking syscall on the queue's thread.
pub struct SyncEngine {
    fd: RawFd,
    done: Vec<Completion>,
}

impl SyncEngine {
    pub fn new(fd: RawFd) -> SyncEngine {
        SyncEngine {
            fd,
            done: Vec::new(),
        }
    }

    pub fn run(&mut self, tag: u64, op: Op<'_>) {
        let result = blocking_op(self.fd, op);
        self.done.push(Completion { tag, result });
    }

    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.done);
    }
}
