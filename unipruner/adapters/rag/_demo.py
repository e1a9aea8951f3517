"""The ``unipruner demo`` RAG section: a HotpotQA question and its 10 paragraphs, pruned.

The record is HotpotQA dev (distractor setting) question ``5ab6d09255429954757d337d`` (Yang et
al., EMNLP 2018; CC BY-SA 4.0), copied into this module from the project's evaluation set
``hotpotqa_distractor_dev250.jsonl.gz``, so the demo reads nothing outside the package.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["demo_documents", "demo_section"]

_RECORD: dict[str, Any] = {
    "id": '5ab6d09255429954757d337d',
    "question": ('The football manager who recruited David Beckham managed Manchester United during what '
                 'timeframe?'),
    "answers": ['from 1986 to 2013'],
    "contexts": [
        ('Joshua Parlby',
            'Joshua Parlby (born 1855 in Longton, Staffordshire) was an English football manager who managed '
            'Manchester City in the 1890s.',
         False),
        ('1996 FA Charity Shield',
            'The 1996 FA Charity Shield (also known as the Littlewoods FA Charity Shield for sponsorship '
            'reasons) was the 74th FA Charity Shield, an annual football match played between the winners of '
            "the previous season's Premier League and FA Cup competitions.  The match was played on 11 August"
            ' 1996 at Wembley Stadium and contested by Manchester United, who had won the Double of Premier '
            'League and FA Cup in 1995–96, and Newcastle United, who had finished as runners-up in the '
            'Premier League.  Manchester United won the match 4–0 with goals from Eric Cantona, Nicky Butt, '
            'David Beckham and Roy Keane.',
         False),
        ('Sir Matt Busby Sports Complex',
            'The Sir Matt Busby Sports Complex is a public leisure centre located in Bellshill, North '
            'Lanarkshire, Scotland.  It is named in honour of Sir Matt Busby, the football manager who was '
            'born in Bellshill in 1909, managed Manchester United from 1945 to 1969 and died in 1994.',
         False),
        ('Ernest Mangnall',
            'James Ernest Mangnall (4 January 1866 – 13 January 1932) was an English football manager who '
            'started his career with Burnley and managed Manchester United between 1903–1912 and then went on'
            ' to manage Manchester City from 1912–1924, and is the only man to date to have managed both '
            'clubs.',
         False),
        ('David Beckham Academy',
            'The David Beckham Academy was a football school founded by England international David Beckham '
            'in 2005.  In 2009 it operated in two locations: in London, United Kingdom, and in Los Angeles, '
            'California, United States.  The academy pulled out of the London site at the end of the lease in'
            ' October 2009, and the California branch closed soon after.',
         False),
        ('1995–96 Manchester United F.C. season',
            "The 1995–96 season was Manchester United's fourth season in the Premier League, and their 21st "
            'consecutive season in the top division of English football.  United finished the season by '
            'becoming the first English team to win the Double (league title and FA Cup) twice.  Their '
            'triumph was made all the more remarkable by the fact that Alex Ferguson had sold experienced '
            'players Paul Ince, Mark Hughes and Andrei Kanchelskis before the start of the season, and not '
            'made any major signings.  Instead, he had drafted in young players like Nicky Butt, David '
            'Beckham, Paul Scholes and the Neville brothers, Gary and Phil.',
         True),
        ("The Class of '92",
            "The Class of '92 is a 2013 British documentary film, released on 1 December 2013.  The film "
            'centres on the rise of six young Manchester United footballers – David Beckham, Nicky Butt, Ryan'
            ' Giggs, Gary Neville, Phil Neville and Paul Scholes – and details their careers for Manchester '
            'United starting in 1992.',
         False),
        ("David Beckham's Soccer USA",
            "David Beckham's Soccer USA was a football highlights and general discussion show presented by "
            'Tim Lovejoy and produced and broadcast in the United Kingdom by Five.  The show began following '
            "David Beckham's move to Los Angeles Galaxy, and Beckham often contributes to the show in the "
            'form of Interviews. Each week there was a special guest in the studio, usually a British sports '
            'personality, to whom Lovejoy chatted about their career and their views on Major League Soccer.'
            '  A slightly different version of the show hosted by Natalie Pinkham and completely devoid of '
            'any content derived from British studio footage was broadcast in the USA on Fox Soccer Channel.',
         False),
        ('Matt Busby',
            'Sir Alexander Matthew Busby, CBE, KCSG (26 May 1909 – 20 January 1994) was a Scottish football '
            'player and manager, who managed Manchester United between 1945 and 1969 and again for the second'
            ' half of the 1970–71 season.  He is widely regarded as one of the greatest managers of all time.'
            '  His managerial records and longevity at the helm of Manchester United are surpassed only by '
            'Sir Alex Ferguson.',
         False),
        ('Alex Ferguson',
            'Sir Alexander Chapman Ferguson, CBE (born 31 December 1941) is a Scottish former football '
            'manager and player who managed Manchester United from 1986 to 2013.  He is regarded by many '
            'players, managers and analysts to be one of the greatest and most successful managers of all '
            'time.',
         True),
    ],
}


def demo_documents() -> tuple[str, list[dict[str, Any]], list[str]]:
    """The demo question, its 10 paragraphs as ``{text, metadata}`` documents, and the answers."""
    docs = [{"text": f"{title}. {text}", "metadata": {"title": title, "gold": gold}}
            for title, text, gold in _RECORD["contexts"]]
    return _RECORD["question"], docs, list(_RECORD["answers"])


def demo_section(console: Any, ratio: float) -> None:
    """Prune a HotpotQA question's 10 paragraphs to ``ratio`` of their tokens and show what survived.

    Uses the embedding scorer (all-MiniLM-L6-v2, offline) with a global sentence budget, so
    whole distractor paragraphs can be dropped (RAG context pruning as in Provence, Chirkova et
    al., ICLR 2025). Prints per-paragraph tokens kept, the kept text, and whether a gold answer
    string is still in the pruned context.
    """
    import torch
    from rich.table import Table

    from ..._threads import limit_threads
    from ...select import Budget
    from ._pruner import ContextPruner

    console.rule(f"[bold]rag: pruning a HotpotQA question's 10 paragraphs to {ratio:.0%} of their tokens")
    question, docs, answers = demo_documents()
    pruner = ContextPruner("query_similarity", Budget(ratio=ratio))
    t0 = time.perf_counter()
    with limit_threads(min(2, torch.get_num_threads())):  # the caller's setting comes back afterwards
        result = pruner.prune(question, docs)
    dt = time.perf_counter() - t0
    console.print(f"question: {question!r}  (gold answer: {answers[0]!r})")
    table = Table()
    for col in ("#", "paragraph", "gold", "score", "tokens kept"):
        table.add_column(col, justify="left" if col == "paragraph" else "right")
    kept = {d.index: d for d in result.documents}
    for i, doc in enumerate(docs):
        k = kept.get(i)
        table.add_row(str(i), doc["metadata"]["title"], "yes" if doc["metadata"]["gold"] else "",
                      f"{k.score:.2f}" if k else "", f"{k.tokens_after}/{k.tokens_before}" if k else "dropped")
    console.print(table)
    s = result.stats
    console.print(f"kept {s.tokens_after}/{s.tokens_before} tokens ({s.ratio:.1%}, {s.compression:.1f}x), "
                  f"{s.documents_after}/{s.documents_before} paragraphs, in {dt:.2f} s")
    console.print("[bold]pruned context:[/] " + result.text(" | "))
    survived = any(a in result.text() for a in answers)
    console.print(f"answer {answers[0]!r} survived: " + ("[bold green]yes[/]" if survived else "[bold red]no[/]"))
