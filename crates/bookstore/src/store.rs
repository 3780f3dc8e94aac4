//! The shelves and books, and what each Bookstore method does to them.
//!
//! Plain synchronous code behind one mutex (calls are short; no lock is held across an await).
//! Errors are [`tonic::Status`] values because they are what a gRPC caller sees.
//!
//! Rules (the sample's, plus what ESPv2's test cases expect of the backend):
//! - A shelf or book created with id 0 gets the next free id (one above the highest); a nonzero
//!   id is kept, and refused with ALREADY_EXISTS when taken, so `POST /v1/shelves?shelf.id=123`
//!   answers with id 123 as ESPv2's test backend does.
//! - Reading a missing shelf or book is NOT_FOUND, naming it.
//! - Deleting is idempotent: deleting what is not there is OK (ESPv2's case 9 deletes book 1 of
//!   shelf 125, which was never created, and expects `{}`).
//! - The store is bounded ([`MAX_SHELVES`], [`MAX_BOOKS`]) so a client cannot grow it without
//!   limit; past the bound a create is RESOURCE_EXHAUSTED.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use tonic::Status;

use crate::proto::{Book, Shelf};

/// Most shelves the store holds.
pub const MAX_SHELVES: usize = 10_000;
/// Most books the store holds, over all shelves.
pub const MAX_BOOKS: usize = 100_000;

#[derive(Default)]
struct Inner {
    shelves: BTreeMap<i64, Shelf>,
    /// shelf id → (book id → book); an entry exists for every shelf.
    books: BTreeMap<i64, BTreeMap<i64, Book>>,
    book_count: usize,
}

/// The in-memory bookstore.
#[derive(Default)]
pub struct Store {
    inner: Mutex<Inner>,
}

impl Store {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The sample's data: shelves 100 "Kids" and 200 "Classic", book 2001 on shelf 200.
    pub fn seeded() -> Self {
        let store = Self::new();
        {
            let mut inner = store.lock();
            for (id, theme) in [(100, "Kids"), (200, "Classic")] {
                inner.shelves.insert(
                    id,
                    Shelf {
                        id,
                        theme: theme.to_string(),
                        any: None,
                    },
                );
                inner.books.insert(id, BTreeMap::new());
            }
            let hamlet = Book {
                id: 2001,
                author: "Shakspeare".to_string(),
                title: "Hamlet".to_string(),
                ..Default::default()
            };
            if let Some(shelf) = inner.books.get_mut(&200) {
                shelf.insert(2001, hamlet);
            }
            inner.book_count = 1;
        }
        store
    }

    // A panic while holding the lock cannot leave the maps half-updated in a way that matters
    // (each method finishes its inserts before returning), so a poisoned lock is still used.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every shelf, by id.
    pub fn list_shelves(&self) -> Vec<Shelf> {
        self.lock().shelves.values().cloned().collect()
    }

    /// Adds a shelf; see the module docs for ids.
    pub fn create_shelf(&self, shelf: Shelf) -> Result<Shelf, Status> {
        let mut inner = self.lock();
        if inner.shelves.len() >= MAX_SHELVES {
            return Err(Status::resource_exhausted(format!(
                "the bookstore holds at most {MAX_SHELVES} shelves"
            )));
        }
        let id = if shelf.id == 0 {
            let id = next_id(inner.shelves.keys());
            if inner.shelves.contains_key(&id) {
                return Err(no_free_id());
            }
            id
        } else if inner.shelves.contains_key(&shelf.id) {
            return Err(Status::already_exists(format!(
                "shelf {} already exists",
                shelf.id
            )));
        } else {
            shelf.id
        };
        let shelf = Shelf { id, ..shelf };
        inner.shelves.insert(id, shelf.clone());
        inner.books.insert(id, BTreeMap::new());
        Ok(shelf)
    }

    /// One shelf.
    pub fn get_shelf(&self, id: i64) -> Result<Shelf, Status> {
        self.lock()
            .shelves
            .get(&id)
            .cloned()
            .ok_or_else(|| shelf_not_found(id))
    }

    /// Removes a shelf and its books (OK when there is no such shelf).
    pub fn delete_shelf(&self, id: i64) {
        let mut inner = self.lock();
        inner.shelves.remove(&id);
        if let Some(books) = inner.books.remove(&id) {
            inner.book_count -= books.len();
        }
    }

    /// The books of a shelf, by id.
    pub fn list_books(&self, shelf: i64) -> Result<Vec<Book>, Status> {
        self.lock()
            .books
            .get(&shelf)
            .map(|b| b.values().cloned().collect())
            .ok_or_else(|| shelf_not_found(shelf))
    }

    /// Adds a book to a shelf; see the module docs for ids.
    pub fn create_book(&self, shelf: i64, book: Book) -> Result<Book, Status> {
        let mut inner = self.lock();
        if inner.book_count >= MAX_BOOKS {
            return Err(Status::resource_exhausted(format!(
                "the bookstore holds at most {MAX_BOOKS} books"
            )));
        }
        let books = inner
            .books
            .get_mut(&shelf)
            .ok_or_else(|| shelf_not_found(shelf))?;
        let id = if book.id == 0 {
            let id = next_id(books.keys());
            if books.contains_key(&id) {
                return Err(no_free_id());
            }
            id
        } else if books.contains_key(&book.id) {
            return Err(Status::already_exists(format!(
                "book {} already exists on shelf {shelf}",
                book.id
            )));
        } else {
            book.id
        };
        let book = Book { id, ..book };
        books.insert(id, book.clone());
        inner.book_count += 1;
        Ok(book)
    }

    /// One book.
    pub fn get_book(&self, shelf: i64, book: i64) -> Result<Book, Status> {
        let inner = self.lock();
        let books = inner
            .books
            .get(&shelf)
            .ok_or_else(|| shelf_not_found(shelf))?;
        books.get(&book).cloned().ok_or_else(|| {
            Status::not_found(format!("Unable to find book {book} on shelf {shelf}"))
        })
    }

    /// Removes a book (OK when there is no such book or shelf).
    pub fn delete_book(&self, shelf: i64, book: i64) {
        let mut inner = self.lock();
        let removed = inner
            .books
            .get_mut(&shelf)
            .and_then(|b| b.remove(&book))
            .is_some();
        if removed {
            inner.book_count -= 1;
        }
    }
}

fn no_free_id() -> Status {
    Status::resource_exhausted("no id is free above the highest one in use; give an id")
}

fn shelf_not_found(id: i64) -> Status {
    Status::not_found(format!("Unable to find shelf {id}"))
}

/// One above the highest id in use (1 when none), saturating rather than wrapping.
fn next_id<'a>(ids: impl DoubleEndedIterator<Item = &'a i64>) -> i64 {
    ids.max().map_or(1, |m| m.saturating_add(1).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn seed_data_is_the_samples() {
        let s = Store::seeded();
        let shelves = s.list_shelves();
        assert_eq!(
            shelves
                .iter()
                .map(|s| (s.id, s.theme.as_str()))
                .collect::<Vec<_>>(),
            [(100, "Kids"), (200, "Classic")]
        );
        let hamlet = s.get_book(200, 2001).unwrap();
        assert_eq!(
            (hamlet.author.as_str(), hamlet.title.as_str()),
            ("Shakspeare", "Hamlet")
        );
        assert!(s.list_books(100).unwrap().is_empty());
    }

    #[test]
    fn missing_things_are_not_found_and_named() {
        let s = Store::seeded();
        let e = s.get_shelf(-1).unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert_eq!(e.message(), "Unable to find shelf -1");
        let e = s.get_book(200, 7).unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert_eq!(e.message(), "Unable to find book 7 on shelf 200");
        assert_eq!(s.list_books(3).unwrap_err().code(), Code::NotFound);
        assert_eq!(
            s.create_book(3, Book::default()).unwrap_err().code(),
            Code::NotFound
        );
    }

    #[test]
    fn ids_are_kept_or_assigned_and_never_reused_while_taken() {
        let s = Store::seeded();
        let kept = s
            .create_shelf(Shelf {
                id: 123,
                theme: "kids".into(),
                any: None,
            })
            .unwrap();
        assert_eq!(kept.id, 123);
        let next = s.create_shelf(Shelf::default()).unwrap();
        assert_eq!(next.id, 201);
        let dup = s.create_shelf(Shelf {
            id: 123,
            ..Default::default()
        });
        assert_eq!(dup.unwrap_err().code(), Code::AlreadyExists);

        let b = s
            .create_book(
                100,
                Book {
                    id: 4,
                    author: "Leo Tolstoy".into(),
                    title: "War and Peace".into(),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(b.id, 4);
        assert_eq!(s.create_book(100, Book::default()).unwrap().id, 5);
        assert_eq!(
            s.create_book(
                100,
                Book {
                    id: 4,
                    ..Default::default()
                }
            )
            .unwrap_err()
            .code(),
            Code::AlreadyExists
        );
        // The highest id saturates instead of wrapping to a negative or taken id.
        s.create_shelf(Shelf {
            id: i64::MAX,
            ..Default::default()
        })
        .unwrap();
        let e = s.create_shelf(Shelf::default()).unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);
    }

    #[test]
    fn deletes_are_idempotent_and_take_the_books_along() {
        let s = Store::seeded();
        s.delete_book(125, 1);
        s.delete_book(200, 2001);
        assert_eq!(s.get_book(200, 2001).unwrap_err().code(), Code::NotFound);
        s.create_book(200, Book::default()).unwrap();
        s.delete_shelf(200);
        s.delete_shelf(200);
        assert_eq!(s.get_shelf(200).unwrap_err().code(), Code::NotFound);
        assert_eq!(s.lock().book_count, 0);
    }

    #[test]
    fn the_store_is_bounded() {
        let s = Store::new();
        for _ in 0..MAX_SHELVES {
            s.create_shelf(Shelf::default()).unwrap();
        }
        let e = s.create_shelf(Shelf::default()).unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);
        s.lock().book_count = MAX_BOOKS;
        assert_eq!(
            s.create_book(1, Book::default()).unwrap_err().code(),
            Code::ResourceExhausted
        );
    }
}
