"""Write the prompt sets shipped with pastalm: pastalm/data/prompts/{train,eval}.jsonl.

Prompts are templates x topic lists plus hand-written asks, all written for this project. Each record has
`id`, `prompt`, `category`, `parallel` (whether the ask has independent parts), `template` and `topic`.
The split is by (template, topic) pair, so no pair and no prompt is in both sets. Deterministic: rerunning
this script rewrites the same files.

    python scripts/make_prompts.py [--eval-per-category 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "pastalm" / "data" / "prompts"

HABITS = [
    "sleeping better", "saving money", "learning a new language", "staying focused while studying",
    "running a first marathon", "keeping houseplants alive", "cooking healthy meals on a budget",
    "reducing stress at work", "writing a strong resume", "preparing for a job interview",
    "traveling with a small budget", "keeping a clean home", "speaking in public", "learning to draw",
    "starting a vegetable garden", "drinking more water", "making friends in a new city",
    "taking better photos with a phone", "staying safe online", "writing clear emails",
    "training a puppy", "reading more books", "managing a small team", "improving your posture",
    "studying for an exam", "waking up early", "reducing food waste", "staying motivated to exercise",
    "learning to play the guitar", "organizing a closet", "hosting a dinner party", "working from home",
    "negotiating a salary", "cutting down on sugar", "protecting your eyes from screens",
    "keeping a journal", "planning a wedding", "moving to a new apartment", "caring for a cat",
    "reducing your electricity bill",
]
SUBJECTS = [
    "regular exercise", "meditation", "learning to code", "drinking green tea", "cycling to work",
    "reading fiction", "volunteering", "owning a dog", "solar panels", "public libraries",
    "bilingual education", "team sports for children", "a plant-based diet", "walking every day",
    "open-source software", "online courses", "electric cars", "recycling", "remote work",
    "a four-day work week", "learning music", "spending time in nature", "journaling",
    "cooking at home", "city parks", "public transport", "renewable energy", "getting enough sleep",
    "studying abroad", "keeping a budget", "yoga", "board games", "gardening", "travel",
    "learning history", "using a password manager", "wearing sunscreen", "taking breaks at work",
]
TASKS = [
    "make a cup of tea", "change a flat bicycle tire", "plant a tree", "bake bread at home",
    "set up a new email account", "write a cover letter", "clean a laptop keyboard",
    "start a podcast", "make a paper airplane", "boil an egg", "paint a room", "create a monthly budget",
    "back up the photos on a phone", "prepare for a long hike", "learn to swim as an adult",
    "make pancakes", "build a birdhouse", "write a short story", "organize a study schedule",
    "open a savings account", "make a smoothie", "wash a wool sweater", "set up a fish tank",
    "pack a suitcase efficiently", "plan a road trip", "make homemade pizza", "start running",
    "repot a plant", "write a thank-you note", "clean a bathroom", "brew coffee with a French press",
    "make a simple website", "prepare a presentation", "teach a child to ride a bike",
    "make a grocery list", "train for a 5k race",
]
PAIRS = [
    ("cats", "dogs"), ("tea", "coffee"), ("trains", "planes"), ("books", "movies"),
    ("summer", "winter"), ("city life", "country life"), ("renting", "buying a home"),
    ("Python", "JavaScript"), ("running", "swimming"), ("email", "phone calls"),
    ("paper books", "e-readers"), ("working from home", "working in an office"),
    ("public schools", "private schools"), ("electric cars", "gasoline cars"),
    ("laptops", "desktop computers"), ("the sun", "the moon"), ("oceans", "lakes"),
    ("butter", "olive oil"), ("chess", "checkers"), ("violins", "guitars"), ("bicycles", "scooters"),
    ("wood", "steel"), ("solar power", "wind power"), ("baking", "frying"), ("rice", "pasta"),
    ("soccer", "basketball"), ("apples", "oranges"), ("camping", "staying in a hotel"),
    ("credit cards", "debit cards"), ("radio", "podcasts"), ("frogs", "toads"),
    ("mountains", "beaches"), ("history", "geography"), ("tablets", "smartphones"),
]
THINGS = [
    "fruits that are high in vitamin C", "famous painters", "countries in South America",
    "board games for families", "ways to reuse glass jars", "musical instruments", "kinds of clouds",
    "healthy breakfast ideas", "hobbies you can do at home", "animals that live in the ocean",
    "uses of baking soda", "classic novels", "vegetables that grow quickly", "indoor plants",
    "programming languages", "sources of protein", "ways to be kind to others", "rainy day activities",
    "skills every adult should learn", "items for a first aid kit", "gift ideas for a teacher",
    "famous scientists", "things to pack for a beach trip", "ways to save water at home",
    "types of renewable energy", "birds found in gardens", "desserts made with apples",
    "questions to ask in a job interview", "ideas for a birthday party", "warm-up exercises",
    "features of a good website", "ways to learn new words", "winter sports", "spices used in cooking",
    "benefits of walking", "reasons to learn history", "careers in science", "things to do in a park",
]
CONCEPTS = [
    "photosynthesis", "a budget", "recycling", "a volcano", "the water cycle", "inflation",
    "a vaccine", "a solar panel", "machine learning", "a rainbow", "compound interest", "the internet",
    "a democracy", "an earthquake", "a black hole", "a library", "composting", "a credit score",
    "a bridge", "the immune system", "a habit", "a password", "a thunderstorm", "a calendar",
    "an ecosystem", "a museum", "a map", "a startup", "a lighthouse", "a coral reef",
]
ESSAYS = [
    "the importance of sleep", "climate change", "the history of the bicycle", "social media and teenagers",
    "why reading matters", "the benefits of learning music", "space exploration", "healthy eating",
    "the future of work", "protecting endangered animals", "the role of libraries",
    "the invention of the printing press", "friendship", "city gardens", "the value of volunteering",
    "online learning", "the ocean", "artificial intelligence in daily life", "saving energy at home",
    "the history of tea", "team sports", "travel and culture", "the life of bees", "public transport",
]

COUNTRIES = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Canada", "Ottawa"), ("Egypt", "Cairo"),
    ("Spain", "Madrid"), ("Germany", "Berlin"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
    ("Norway", "Oslo"), ("Australia", "Canberra"), ("Brazil", "Brasilia"), ("India", "New Delhi"),
    ("Mexico", "Mexico City"), ("Portugal", "Lisbon"), ("Greece", "Athens"), ("Ireland", "Dublin"),
    ("Chile", "Santiago"), ("Thailand", "Bangkok"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"),
    ("Argentina", "Buenos Aires"), ("Vietnam", "Hanoi"), ("Austria", "Vienna"), ("Finland", "Helsinki"),
]
FACTS = [
    "Who wrote Romeo and Juliet?", "How many legs does a spider have?", "What is the largest planet in our solar system?",
    "What is the boiling point of water in Celsius at sea level?", "Who painted the Mona Lisa?",
    "What is the chemical symbol for gold?", "How many continents are there?", "What is the tallest mountain on Earth?",
    "What language is spoken in Brazil?", "How many days are in a leap year?", "What is the freezing point of water in Fahrenheit?",
    "Which planet is known as the Red Planet?", "What is the largest ocean on Earth?", "How many sides does a hexagon have?",
    "What gas do plants absorb from the air?", "Who was the first person to walk on the Moon?", "What is the longest river in Africa?",
    "How many minutes are in an hour?", "What is the hardest natural substance?", "What is the smallest prime number?",
    "Which animal is known as the king of the jungle?", "What color do you get by mixing blue and yellow?",
    "How many strings does a standard guitar have?", "What is the main ingredient in guacamole?",
    "In which country are the pyramids of Giza?", "How many players are on a soccer team on the field?",
    "What is the square root of 81?", "Which organ pumps blood through the body?", "What is the currency of Japan?",
    "How many hours are in a day?",
]
WORDS = [
    "ephemeral", "resilience", "gravity", "metaphor", "democracy", "empathy", "photosynthesis", "algorithm",
    "nostalgia", "ecosystem", "inflation", "curiosity", "hypothesis", "symmetry", "habitat", "courage",
    "molecule", "irony", "latitude", "harmony", "perimeter", "fossil", "migration", "vocabulary",
    "friction", "patience", "orbit", "synonym", "recipe", "horizon",
]
POEM_TOPICS = [
    "the sea", "autumn leaves", "a cup of coffee", "the moon", "a rainy morning", "a sleeping cat",
    "the first snow", "a lighthouse", "an old tree", "the city at night", "spring flowers", "a river",
    "friendship", "a quiet library", "the stars", "a mountain trail", "a summer storm", "bread baking",
    "a garden", "the wind", "a candle", "morning birds", "the desert", "a small boat",
]
YES_NO = [
    "Is the Earth round?", "Is a tomato a fruit?", "Can penguins fly?", "Is the Sun a star?",
    "Is water made of hydrogen and oxygen?", "Do fish breathe with gills?", "Is Paris the capital of Italy?",
    "Is 17 a prime number?", "Can humans breathe underwater without equipment?", "Is ice lighter than water?",
    "Do bats use echolocation?", "Is Mount Everest in Africa?", "Is a whale a mammal?", "Does sound travel faster than light?",
    "Is gold a metal?", "Is the Pacific the largest ocean?", "Do plants need sunlight to grow?",
    "Is Antarctica a desert?", "Can a square have five sides?", "Is milk a source of calcium?",
    "Do spiders have six legs?", "Is Venus closer to the Sun than Earth?", "Is chess a board game?",
    "Are bananas blue?", "Is 100 an even number?",
]

N_WORDS = ["three", "four", "five", "six"]


def templated() -> dict[str, list[tuple[str, str, str]]]:
    """Return {category: [(template, topic, prompt), ...]}."""
    out: dict[str, list[tuple[str, str, str]]] = {}

    def add(cat, template, topics, fmt=None):
        for i, t in enumerate(topics):
            text = template.format(t=t, n=N_WORDS[(i + len(template)) % len(N_WORDS)]) if fmt is None else fmt(template, t, i)
            out.setdefault(cat, []).append((template, t if isinstance(t, str) else " vs ".join(t), text))

    for tpl in ["Give me {n} tips for {t}.", "What are some good tips for {t}?",
                "I need advice on {t}. What should I do?", "Share your best advice for {t}.",
                "How can I get better at {t}?"]:
        add("tips", tpl, HABITS)
    for tpl in ["List {n} {t}.", "Name some {t} and say a little about each.", "What are some {t}?", "Tell me about a few {t}."]:
        add("list", tpl, THINGS)
    for tpl in ["How do I {t}? Explain step by step.", "Give step-by-step instructions to {t}.",
                "What are the steps to {t}?", "Can you explain how to {t}?"]:
        add("steps", tpl, TASKS)
    pair_fmt = lambda tpl, ab, i: tpl.format(a=ab[0], b=ab[1])
    for tpl in ["Compare {a} and {b}.", "What are the main differences between {a} and {b}?",
                "How are {a} and {b} similar, and how are they different?"]:
        add("comparison", tpl, PAIRS, pair_fmt)
    for tpl in ["What are the pros and cons of {t}?", "List the advantages and disadvantages of {t}.",
                "What are the benefits and drawbacks of {t}?"]:
        add("pros_cons", tpl, SUBJECTS)
    for tpl in ["What is {t}, how does it work, and why does it matter?",
                "Explain {t}: what it is, where we see it, and one common misconception about it.",
                "Tell me about {t}. What is it, and what are its main parts?"]:
        add("multi_part", tpl, CONCEPTS)
    for tpl in ["Write an outline for an essay about {t}.", "Outline a short presentation on {t}.",
                "Give me a structure with main sections for a blog post about {t}."]:
        add("outline", tpl, ESSAYS)

    for tpl in ["What is the capital of {t}?", "Which city is the capital of {t}? Answer in one sentence."]:
        add("fact", tpl, [c for c, _ in COUNTRIES])
    for q in FACTS:
        out["fact"].append(("(hand-written)", q, q))
    for tpl in ["Define the word '{t}' in one sentence.", "What does '{t}' mean? Keep it short."]:
        add("definition", tpl, WORDS)
    for tpl in ["Write a short poem about {t}.", "Write a haiku about {t}.", "Write a four-line rhyme about {t}."]:
        add("poem", tpl, POEM_TOPICS)
    for q in YES_NO:
        out.setdefault("yes_no", []).append(("(hand-written)", q, q))
        out["yes_no"].append(("{t} Answer yes or no.", q, f"{q} Answer yes or no."))
    rng = random.Random(1234)
    arith = []
    for i in range(160):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op, sym = [("plus", "+"), ("minus", "-"), ("times", "*")][i % 3]
        tpl = ["What is {a} {op} {b}?", "Compute {a} {sym} {b}.", "Calculate {a} {sym} {b} and give only the result."][i // 3 % 3]
        arith.append((tpl, f"{a} {sym} {b}", tpl.format(a=a, b=b, op=op, sym=sym)))
    out["arithmetic"] = arith
    return out


HAND_WRITTEN_PARALLEL = [
    ("multi_part", "I'm visiting Rome for three days. What should I see, what should I eat, and how should I get around?"),
    ("multi_part", "My tomato plants have yellow leaves. What could be causing it and how can I fix each cause?"),
    ("list", "Suggest names for a small bakery and explain the idea behind each one."),
    ("tips", "I just got my first job as a software developer. How can I do well in my first month?"),
    ("steps", "Walk me through writing a research paper, from choosing a topic to submitting it."),
    ("comparison", "Should I learn the piano or the guitar first? Compare them for a beginner."),
    ("pros_cons", "I'm thinking about adopting a rabbit. What should I consider for and against it?"),
    ("outline", "Plan a one-week study schedule for learning basic statistics."),
    ("list", "What should I bring for a weekend camping trip in the mountains?"),
    ("multi_part", "Explain what a computer's CPU, memory, and storage each do."),
    ("tips", "How can a small team run better meetings?"),
    ("list", "Give me ideas for a science fair project for a ten-year-old."),
    ("multi_part", "What are the rules of tennis, the equipment you need, and how points are counted?"),
    ("steps", "How can I prepare my garden for winter?"),
    ("list", "Recommend some exercises for a full-body workout without equipment."),
    ("pros_cons", "Is it better to take notes by hand or on a laptop? Give arguments for both."),
    ("outline", "Outline the chapters of a beginner's guide to photography."),
    ("tips", "How do I keep my kids busy on a long car trip?"),
    ("list", "What are the main food groups and what does each give the body?"),
    ("multi_part", "Describe the four seasons and what usually happens in nature during each."),
    ("steps", "How do I make a simple vegetable soup?"),
    ("tips", "What can I do to make my small apartment feel bigger?"),
    ("list", "Name the planets of the solar system with one fact about each."),
    ("comparison", "What is the difference between weather and climate, and between a virus and a bacterium?"),
    ("multi_part", "What are the three states of matter and how does each behave?"),
    ("tips", "How can I become a better listener?"),
    ("list", "Suggest healthy snacks for an afternoon at the office."),
    ("outline", "Create an agenda for a one-hour team workshop on customer service."),
    ("steps", "How should I prepare for a job interview the day before and the morning of?"),
    ("list", "What are some good questions to ask when buying a used car?"),
]
HAND_WRITTEN_SERIAL = [
    ("fact", "What year did World War II end?"),
    ("arithmetic", "If I have 12 apples and give away 5, how many are left?"),
    ("definition", "In one sentence, what is a noun?"),
    ("poem", "Write a two-line poem about coffee."),
    ("yes_no", "Is it safe to look directly at the Sun? Answer briefly."),
    ("fact", "What is the speed of light, roughly?"),
    ("arithmetic", "What is 15 percent of 200?"),
    ("definition", "What is a verb? Answer in one sentence."),
    ("poem", "Write a limerick about a cat who likes to nap."),
    ("yes_no", "Is a spider an insect?"),
    ("fact", "What is the capital city of Scotland?"),
    ("arithmetic", "How many seconds are in five minutes?"),
    ("definition", "Give a one-line definition of 'photosynthesis'."),
    ("fact", "Who invented the telephone?"),
    ("yes_no", "Can you see the Great Wall of China from the Moon with the naked eye?"),
    ("arithmetic", "What is half of 250?"),
]
PARALLEL = {"tips", "list", "steps", "comparison", "pros_cons", "multi_part", "outline"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-per-category", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    train, evals = [], []
    for cat, items in sorted(templated().items()):
        items = list(dict.fromkeys(items))  # drop exact duplicates, keep order
        rng.shuffle(items)
        k = args.eval_per_category
        evals += [(cat, *x) for x in items[:k]]
        train += [(cat, *x) for x in items[k:]]
    hand = [(c, "(hand-written)", p, p) for c, p in HAND_WRITTEN_PARALLEL + HAND_WRITTEN_SERIAL]
    rng.shuffle(hand)
    evals += hand[: len(hand) // 2]
    train += hand[len(hand) // 2:]

    eval_prompts = {p for _, _, _, p in evals}
    eval_pairs = {(t, k) for _, t, k, _ in evals}
    train = [r for r in train if r[3] not in eval_prompts and (r[1], r[2]) not in eval_pairs]
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("eval", evals)):
        rng.shuffle(rows)
        path = args.out / f"{name}.jsonl"
        with path.open("w") as f:
            for i, (cat, tpl, topic, prompt) in enumerate(rows):
                rec = {"id": f"{name}-{i:04d}", "prompt": prompt, "category": cat, "parallel": cat in PARALLEL,
                       "template": tpl, "topic": topic}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        par = sum(cat in PARALLEL for cat, *_ in rows)
        print(f"{path}: {len(rows)} prompts ({par} parallelizable, {len(rows) - par} not)")


if __name__ == "__main__":
    main()
