"""The ``unipruner demo`` RAG section: a HotpotQA question and its 10 paragraphs, pruned.

The record is HotpotQA dev (distractor setting) question ``5a8c7595554299585d9e36b6``, copied
from ``shared/data/qa/hotpotqa_distractor_dev250.jsonl.gz`` (Yang et al., EMNLP 2018;
CC BY-SA 4.0) so the demo needs no data download.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["demo_documents", "demo_section"]

_RECORD: dict[str, Any] = {
    "id": '5a8c7595554299585d9e36b6',
    "question": ("What government position was held by the woman who portrayed Corliss Archer in the film "
                 "Kiss and Tell?"),
    "answers": ['Chief of Protocol'],
    "contexts": [
        ('Meet Corliss Archer',
            "Meet Corliss Archer, a program from radio's Golden Age, ran from January 7, 1943 to September 30, "
            '1956.  Although it was CBS\'s answer to NBC\'s popular "A Date with Judy", it was also broadcast by '
            'NBC in 1948 as a summer replacement for "The Bob Hope Show".  From October 3, 1952 to June 26, 1953,'
            " it aired on ABC, finally returning to CBS.  Despite the program's long run, fewer than 24 episodes "
            'are known to exist.',
         False),
        ('Shirley Temple',
            'Shirley Temple Black (April 23, 1928 – February 10, 2014) was an American actress, singer, dancer, '
            "businesswoman, and diplomat who was Hollywood's number one box-office draw as a child actress from "
            '1935 to 1938.  As an adult, she was named United States ambassador to Ghana and to Czechoslovakia '
            'and also served as Chief of Protocol of the United States.',
         True),
        ('Janet Waldo',
            'Janet Marie Waldo (February 4, 1920 – June 12, 2016) was an American radio and voice actress.  She '
            'is best known in animation for voicing Judy Jetson, Nancy in "Shazzan", Penelope Pitstop, and Josie '
            'in "Josie and the Pussycats", and on radio as the title character in "Meet Corliss Archer".',
         False),
        ('Meet Corliss Archer (TV series)',
            'Meet Corliss Archer is an American television sitcom that aired on CBS (July 13, 1951 - August 10, '
            '1951) and in syndication via the Ziv Company from April to December 1954.  The program was an '
            'adaptation of the radio series of the same name, which was based on a series of short stories by F. '
            'Hugh Herbert.',
         False),
        ('Lord High Treasurer',
            'The post of Lord High Treasurer or Lord Treasurer was an English government position and has been a '
            'British government position since the Acts of Union of 1707.  A holder of the post would be the '
            'third-highest-ranked Great Officer of State, below the Lord High Steward and the Lord High '
            'Chancellor.',
         False),
        ('A Kiss for Corliss',
            'A Kiss for Corliss is a 1949 American comedy film directed by Richard Wallace and written by Howard '
            'Dimsdale.  It stars Shirley Temple in her final starring role as well as her final film appearance.'
            '  It is a sequel to the 1945 film "Kiss and Tell".  "A Kiss for Corliss" was retitled "Almost a '
            'Bride" before release and this title appears in the title sequence.  The film was released on '
            'November 25, 1949, by United Artists.',
         False),
        ('Kiss and Tell (1945 film)',
            'Kiss and Tell is a 1945 American comedy film starring then 17-year-old Shirley Temple as Corliss '
            'Archer.  In the film, two teenage girls cause their respective parents much concern when they start '
            "to become interested in boys.  The parents' bickering about which girl is the worse influence causes"
            ' more problems than it solves.',
         True),
        ('Secretary of State for Constitutional Affairs',
            'The office of Secretary of State for Constitutional Affairs was a British Government position, '
            "created in 2003.  Certain functions of the Lord Chancellor which related to the Lord Chancellor's "
            'Department were transferred to the Secretary of State.  At a later date further functions were also '
            'transferred to the Secretary of State for Constitutional Affairs from the First Secretary of State, '
            'a position within the government held by the Deputy Prime Minister.',
         False),
        ('Village accountant',
            'The Village Accountant (variously known as "Patwari", "Talati", "Patel", "Karnam", "Adhikari", '
            '"Shanbogaru","Patnaik" etc.) is an administrative government position found in rural parts of the '
            'Indian sub-continent.  The office and the officeholder are called the "patwari" in Telangana, '
            'Bengal, North India and in Pakistan while in Sindh it is called "tapedar".  The position is known as'
            ' the "karnam" in Andhra Pradesh, "patnaik" in Orissa or "adhikari" in Tamil Nadu, while it is '
            'commonly known as the "talati" in Karnataka, Gujarat and Maharashtra.  The position was known as the'
            ' "kulkarni" in Northern Karnataka and Maharashtra.  The position was known as the "shanbogaru" in '
            'South Karnataka.',
         False),
        ('Charles Craft',
            'Charles Craft (May 9, 1902 – September 19, 1968) was an English-born American film and television '
            'editor.  Born in the county of Hampshire in England on May 9, 1902, Craft would enter the film '
            'industry in Hollywood in 1927.  The first film he edited was the Universal Pictures silent film, '
            '"Painting the Town".  Over the next 25 years, Craft would edit 90 feature-length films.  In the '
            'early 1950s he would switch his focus to the small screen, his first show being "Racket Squad", from'
            ' 1951–53, for which he was the main editor, editing 93 of the 98 episodes.  He would work on several'
            ' other series during the 1950s, including "Meet Corliss Archer" (1954), "Science Fiction Theatre" '
            '(1955–56), and "Highway Patrol" (1955–57).  In the late 1950s and early 1960s he was one of the main'
            ' editors on "Sea Hunt", starring Lloyd Bridges, editing over half of the episodes.  His final film '
            'work would be editing "Flipper\'s New Adventure" (1964, the sequel to 1963\'s "Flipper".  When the '
            'film was made into a television series, Craft would begin the editing duties on that show, editing '
            'the first 28 episodes before he retired in 1966.  Craft died on September 19, 1968 in Los Angeles, '
            'California.',
         False),
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

    from ...select import Budget
    from ._pruner import ContextPruner

    console.rule(f"[bold]rag: pruning a HotpotQA question's 10 paragraphs to {ratio:.0%} of their tokens")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    question, docs, answers = demo_documents()
    pruner = ContextPruner("embedding", Budget(ratio=ratio), feedback=1)
    t0 = time.perf_counter()
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
