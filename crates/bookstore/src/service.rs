//! The tonic service: each Bookstore method over the [`Store`], including the three streaming
//! ones. Streams are produced message by message through a channel so a proxy in front can be
//! seen forwarding each message as it is produced (with `x-bookstore-stream-delay-ms`, see
//! [`crate::control`]).
//!
//! `ReturnBadStatus` is answered by [`crate::control::handle`] before the call reaches tonic,
//! because tonic's `Status` can only carry the canonical codes and the method exists to return
//! code 74.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::control;
use crate::proto::bookstore_server::Bookstore;
use crate::proto::{
    Book, CreateBookRequest, CreateShelfRequest, DeleteBookRequest, DeleteShelfRequest,
    GetBookRequest, GetShelfRequest, ListBooksRequest, ListBooksResponse, ListShelvesResponse,
    Shelf,
};
use crate::store::Store;

/// A server-side message stream.
pub type BookStream = Pin<Box<dyn Stream<Item = Result<Book, Status>> + Send + 'static>>;

/// How many messages a stream may run ahead of the client.
const STREAM_BUFFER: usize = 4;

/// The Bookstore service over a shared store.
#[derive(Clone)]
pub struct BookstoreService {
    store: Arc<Store>,
}

impl BookstoreService {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }
}

/// Sends `items` one by one, pausing `delay` after each (so the first arrives at once and the
/// stream ends `delay` after the last).
fn paced(items: Vec<Book>, delay: Duration) -> BookStream {
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        for book in items {
            if tx.send(Ok(book)).await.is_err() {
                return; // the client went away
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl Bookstore for BookstoreService {
    async fn list_shelves(
        &self,
        _request: Request<()>,
    ) -> Result<Response<ListShelvesResponse>, Status> {
        Ok(Response::new(ListShelvesResponse {
            shelves: self.store.list_shelves(),
        }))
    }

    async fn create_shelf(
        &self,
        request: Request<CreateShelfRequest>,
    ) -> Result<Response<Shelf>, Status> {
        let shelf = request.into_inner().shelf.unwrap_or_default();
        self.store.create_shelf(shelf).map(Response::new)
    }

    async fn get_shelf(
        &self,
        request: Request<GetShelfRequest>,
    ) -> Result<Response<Shelf>, Status> {
        self.store
            .get_shelf(request.into_inner().shelf)
            .map(Response::new)
    }

    async fn delete_shelf(
        &self,
        request: Request<DeleteShelfRequest>,
    ) -> Result<Response<()>, Status> {
        self.store.delete_shelf(request.into_inner().shelf);
        Ok(Response::new(()))
    }

    async fn list_books(
        &self,
        request: Request<ListBooksRequest>,
    ) -> Result<Response<ListBooksResponse>, Status> {
        let books = self.store.list_books(request.into_inner().shelf)?;
        Ok(Response::new(ListBooksResponse { books }))
    }

    async fn create_book(
        &self,
        request: Request<CreateBookRequest>,
    ) -> Result<Response<Book>, Status> {
        let r = request.into_inner();
        self.store
            .create_book(r.shelf, r.book.unwrap_or_default())
            .map(Response::new)
    }

    async fn get_book(&self, request: Request<GetBookRequest>) -> Result<Response<Book>, Status> {
        let r = request.into_inner();
        self.store.get_book(r.shelf, r.book).map(Response::new)
    }

    async fn delete_book(
        &self,
        request: Request<DeleteBookRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        self.store.delete_book(r.shelf, r.book);
        Ok(Response::new(()))
    }

    type StreamBooksStream = BookStream;

    async fn stream_books(
        &self,
        request: Request<ListBooksRequest>,
    ) -> Result<Response<BookStream>, Status> {
        let delay = control::stream_delay(request.metadata())?;
        let books = self.store.list_books(request.into_inner().shelf)?;
        Ok(Response::new(paced(books, delay)))
    }

    async fn bulk_create_shelf(
        &self,
        request: Request<Streaming<CreateShelfRequest>>,
    ) -> Result<Response<ListShelvesResponse>, Status> {
        let mut stream = request.into_inner();
        let mut shelves = Vec::new();
        while let Some(next) = stream.next().await {
            let shelf = next?.shelf.unwrap_or_default();
            shelves.push(self.store.create_shelf(shelf)?);
        }
        Ok(Response::new(ListShelvesResponse { shelves }))
    }

    type EchoBooksStream = BookStream;

    async fn echo_books(
        &self,
        request: Request<Streaming<Book>>,
    ) -> Result<Response<BookStream>, Status> {
        let delay = control::stream_delay(request.metadata())?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(async move {
            while let Some(next) = inbound.next().await {
                let failed = next.is_err();
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                if tx.send(next).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn return_bad_status(&self, _request: Request<()>) -> Result<Response<()>, Status> {
        // Reached only when the service is used without control::handle in front.
        Err(Status::internal(
            "ReturnBadStatus answers code 74 through portico_bookstore::control::handle, which this server does not use",
        ))
    }

    async fn create_book_with_trailing_single_wildcard(
        &self,
        request: Request<CreateBookRequest>,
    ) -> Result<Response<Book>, Status> {
        self.create_book(request).await
    }

    async fn create_book_with_trailing_double_wildcard(
        &self,
        request: Request<CreateBookRequest>,
    ) -> Result<Response<Book>, Status> {
        self.create_book(request).await
    }

    async fn create_book_with_custom_verb(
        &self,
        request: Request<CreateBookRequest>,
    ) -> Result<Response<Book>, Status> {
        self.create_book(request).await
    }
}
