//! The request body of the client: the whole payload in memory, handed to hyper in chunks so a
//! caller can show upload progress (bytes are counted as hyper takes them for the connection,
//! which HTTP/2 flow control and the socket buffer keep close to what was sent).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// Called with the size of every chunk handed to the connection.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

const CHUNK: usize = 256 * 1024;

pub struct ReqBody {
    data: Bytes,
    progress: Option<Progress>,
}

impl ReqBody {
    pub fn new(data: Bytes, progress: Option<Progress>) -> ReqBody {
        ReqBody { data, progress }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.data.is_empty() {
            return Poll::Ready(None);
        }
        let n = this.data.len().min(CHUNK);
        let chunk = this.data.split_to(n);
        if let Some(p) = &this.progress {
            p(n as u64);
        }
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.len() as u64)
    }
}
