"""An example web app: creating an invoice takes its number by enqueue-and-await.

Run it (with a numbering worker for "invoices" running, and the NUMBERING_* settings):

    uvicorn examples.webapp:app --port 8000
    curl -X POST localhost:8000/invoices -H 'content-type: application/json' \\
         -d '{"customer": "ACME", "amount_cents": 12500}'

How the number and the document stay consistent: the invoice row is written first,
without a number; its id is the request key (``invoice:<id>``). If the app dies after
the number was assigned but before it was saved, asking again with the same key returns
the same number, so ``POST /invoices/{id}/number`` (or a periodic repair job over
invoices whose number is NULL) completes the invoice without a gap or a second number.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, HTTPException
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from numbering import Assignment, Client, create_engine
from numbering.errors import NumberingError, RequestTimeout, SequenceFrozenError

SEQUENCE = os.environ.get("EXAMPLE_SEQUENCE", "invoices")

metadata = sa.MetaData()
invoices = sa.Table(
    "example_invoices",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("customer", sa.String(200), nullable=False),
    sa.Column("amount_cents", sa.BigInteger, nullable=False),
    sa.Column("issued_on", sa.Date, nullable=False),
    # With yearly periods the integer repeats every year: the formatted number (which
    # carries the year) is what is unique.
    sa.Column("number", sa.BigInteger, nullable=True),
    sa.Column("period", sa.String(16), nullable=True),
    sa.Column("formatted", sa.String(255), nullable=True, unique=True),
)

app = FastAPI(title="numbering example: invoices")
engine = create_engine(os.environ["NUMBERING_DATABASE_URL"])
client = Client.from_env()
metadata.create_all(engine)


class NewInvoice(BaseModel):
    customer: str = Field(min_length=1, max_length=200)
    amount_cents: int = Field(gt=0)
    issued_on: dt.date | None = None  # the document date: picks the numbering period


def _row(invoice_id: int) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(sa.select(invoices).where(invoices.c.id == invoice_id)).first()
    if row is None:
        raise HTTPException(404, f"no invoice {invoice_id}")
    data = dict(row._mapping)
    data["issued_on"] = data["issued_on"].isoformat()
    return data


def _save_number(invoice_id: int, block: Assignment) -> None:
    with engine.begin() as conn:
        conn.execute(
            invoices.update()
            .where(invoices.c.id == invoice_id, invoices.c.number.is_(None))
            .values(number=block.value, period=block.period, formatted=block.formatted)
        )


def _insert(new: NewInvoice) -> int:
    with engine.begin() as conn:
        inserted = conn.execute(
            invoices.insert().values(
                customer=new.customer,
                amount_cents=new.amount_cents,
                issued_on=new.issued_on or dt.date.today(),
            )
        ).inserted_primary_key
    assert inserted is not None
    return int(inserted[0])


async def _number(invoice_id: int) -> dict[str, Any]:
    # Database calls run in the thread pool: the event loop keeps serving other requests.
    data = await run_in_threadpool(_row, invoice_id)
    if data["number"] is not None:
        return data
    try:
        block = await client.next_block_async(
            SEQUENCE,
            key=f"invoice:{invoice_id}",  # the document's identity: asking twice is safe
            reference={"invoice": invoice_id},
            date=data["issued_on"],
        )
    except RequestTimeout as exc:  # no worker answered: the invoice waits, unnumbered
        raise HTTPException(503, f"{exc}; retry POST /invoices/{invoice_id}/number") from None
    except SequenceFrozenError as exc:
        raise HTTPException(409, str(exc)) from None
    except NumberingError as exc:
        raise HTTPException(400, str(exc)) from None
    await run_in_threadpool(_save_number, invoice_id, block)
    return await run_in_threadpool(_row, invoice_id)


@app.post("/invoices", status_code=201)
async def create_invoice(new: NewInvoice) -> dict[str, Any]:
    invoice_id = await run_in_threadpool(_insert, new)
    return await _number(invoice_id)


@app.post("/invoices/{invoice_id}/number")
async def number_invoice(invoice_id: int) -> dict[str, Any]:
    """Finish an invoice left without a number (same key: same number)."""
    return await _number(invoice_id)


@app.get("/invoices/{invoice_id}")
def get_invoice(invoice_id: int) -> dict[str, Any]:
    return _row(invoice_id)
