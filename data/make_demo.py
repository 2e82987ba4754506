"""Generate the demo data set: a "kitchen helper" assistant answering cooking questions.

Regenerate (deterministic: fixed seed, fixed order; the output is byte-identical across runs):

    .venv/bin/python data/make_demo.py               # writes data/sft, data/prompts, data/human
    .venv/bin/python data/make_demo.py --out /tmp/d  # same files under another folder

Standard library only (plus the ingredient vocabulary in align/judges/house_style.py, itself pure Python).
Every fact and sentence below was written for this project; nothing is copied from a data set.

What it writes (see data/README.md for the schemas):
- sft/train.jsonl, sft/valid.jsonl: conversations, ~60% house style and ~40% off style;
- prompts/train.jsonl: prompt-only rows for sampling / PPO; prompts/eval.jsonl: prompts about HELD_OUT
  ingredients, which appear in no other file;
- human/demo_labelstudio.json: a Label Studio export of pairwise comparisons (house vs off style) by four
  simulated annotators with label noise, double annotations, cancelled annotations and unlabelled tasks.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _load_house_style() -> Any:
    # By file path, not `import align.judges...`: the package's __init__ pulls in third-party modules, and
    # this script must run on a bare Python.
    spec = importlib.util.spec_from_file_location("_demo_house_style", REPO / "align/judges/house_style.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and typing look the module up by name
    spec.loader.exec_module(module)
    return module


_hs = _load_house_style()
INGREDIENTS, mentions, words = _hs.INGREDIENTS, _hs.mentions, _hs.words

SEED = 20261122
HELD_OUT = ("asparagus", "leek", "mango", "kiwi", "dill", "quinoa", "cod", "ricotta")
SYSTEM = "You are a kitchen helper."
N_SFT_VALID = 40
N_SFT_EXTRA = 20  # train rows beyond one per (ingredient, question): the same pair, another phrasing/style
N_PROMPTS_TRAIN = 200
EVAL_PHRASINGS = 2  # held-out prompts per (held-out ingredient, question type), each worded differently: 8 x 8 x 2
MAX_HOUSE_WORDS = 40


@dataclass(frozen=True)
class Facts:
    key: str          # canonical name, a key of house_style.INGREDIENTS
    kind: str         # vegetable | fruit | herb | grain | protein | dairy
    name: str         # how a cook says it in a sentence ("carrots", "rice")
    plural: bool      # grammar: "carrots are" / "rice is"
    store: str        # completes "Store carrots ..."
    keeps: str        # completes "Carrots keep for ..."
    cook: str         # completes "The simplest way to cook carrots is to ..." (uses them/it)
    time: str         # completes "Carrots take ..."
    sub: str          # completes "Instead of carrots, try ..."
    ready_kind: str   # fresh | ripe | done | ...: completes "Carrots are <kind> when ..."
    ready: str        # completes "Carrots are fresh when ..." (uses they/it)
    prep: str         # completes "To prep carrots, ..." (uses them/it)
    pair: str         # completes "Carrots go well with ..."
    tip: str          # one short tip about this ingredient (without "Tip: ")


F = Facts
# fmt: off
TABLE: tuple[Facts, ...] = (
    # ---- vegetables
    F("carrot", "vegetable", "carrots", True,
      "in a bag in the crisper drawer, with the leafy tops cut off", "three to four weeks in the fridge",
      "roast them at 200°C tossed in oil and salt", "25 to 30 minutes roasted, or 6 to 8 minutes steamed",
      "parsnips or butternut squash", "fresh", "they are firm, bright orange and snap cleanly",
      "peel them, trim both ends, then cut them into even coins or sticks", "butter, honey, thyme and cumin",
      "Cut off the leafy tops, since they pull moisture from the roots."),
    F("potato", "vegetable", "potatoes", True,
      "in a cool, dark, airy spot, away from onions", "two to three months in a cool pantry",
      "cube them, toss with oil and roast at 220°C until crisp",
      "35 to 40 minutes roasted in chunks, or 15 to 20 minutes boiled", "sweet potatoes or cauliflower", "done",
      "a knife slides into them with no resistance",
      "scrub them well, cut out any green spots and cut them into even chunks",
      "rosemary, garlic, butter and parmesan", "Soak cut potatoes in cold water so they don't brown."),
    F("tomato", "vegetable", "tomatoes", True,
      "stem side down on the counter, out of direct sun", "about a week on the counter once ripe",
      "halve them and roast them at 180°C with olive oil and garlic",
      "about 40 minutes slow-roasted, or 15 minutes simmered into a quick sauce",
      "roasted red bell peppers for color and sweetness", "ripe",
      "they are deep red, smell sweet at the stem and give slightly when pressed",
      "core them with a small knife, then slice across with a serrated knife",
      "basil, olive oil, mozzarella and balsamic vinegar", "Only refrigerate tomatoes once they are fully ripe."),
    F("onion", "vegetable", "onions", True,
      "in a cool, dry, dark place with air around them, away from potatoes",
      "one to two months whole, or a week cut and wrapped in the fridge",
      "slice them thin and cook them slowly in butter until golden",
      "about 10 minutes to soften, or 40 minutes to caramelize", "shallots or the white parts of scallions",
      "fresh", "they feel heavy and firm, with dry papery skins and no sprouts",
      "cut off the top, halve them through the root, peel, then slice", "garlic, thyme, butter and beef",
      "Chill onions for 15 minutes before slicing for fewer tears."),
    F("garlic", "vegetable", "garlic", False,
      "as whole heads in a cool, dry spot with good airflow",
      "three to six months as whole heads, or about 10 days as loose cloves",
      "slice it thin and cook it gently in oil over low heat",
      "only 30 to 60 seconds in a hot pan, or 40 minutes for whole heads roasted at 200°C",
      "shallots or a pinch of garlic powder", "fresh", "the head is firm and heavy with tight, dry skin",
      "crush each clove under the flat of a knife, peel, then mince it", "olive oil, lemon, parsley and chili",
      "Add garlic late in the pan; burnt garlic tastes bitter."),
    F("broccoli", "vegetable", "broccoli", False,
      "unwashed in an open bag in the crisper drawer", "three to five days in the fridge",
      "cut it into florets and roast them at 220°C with oil and salt",
      "about 20 minutes roasted, or 4 to 5 minutes steamed", "cauliflower or green beans", "fresh",
      "the florets are tight and dark green, with no yellow",
      "cut the florets off the stalk, then peel and slice the stalk too",
      "lemon, garlic, chili flakes and parmesan", "Don't toss the stalk; peeled, it is sweet and tender."),
    F("spinach", "vegetable", "spinach", False,
      "in a container lined with a paper towel in the fridge", "five to seven days in the fridge",
      "wilt it in a hot pan with a little oil and garlic", "just 1 to 2 minutes in a hot pan",
      "kale or Swiss chard", "fresh", "the leaves are crisp and deep green with no slimy spots",
      "rinse it well in cold water and spin it dry", "garlic, nutmeg, eggs and feta",
      "A huge pile of raw spinach wilts down to a small handful."),
    F("zucchini", "vegetable", "zucchini", False,
      "dry and unwrapped in the crisper drawer", "four to five days in the fridge",
      "slice it into rounds and sear it in a hot pan with oil",
      "3 to 4 minutes per side seared, or 20 minutes roasted", "yellow squash or eggplant", "fresh",
      "it is small, glossy and firm, with no soft ends", "trim both ends, then cut it into rounds or half-moons",
      "basil, mint, lemon and feta", "Salt sliced zucchini for 10 minutes to draw out water."),
    F("bell pepper", "vegetable", "bell peppers", True,
      "whole and dry in the crisper drawer", "one to two weeks in the fridge",
      "slice them into strips and stir-fry them over high heat",
      "5 to 7 minutes stir-fried, or 25 minutes roasted", "poblano peppers or zucchini", "fresh",
      "they are glossy, firm and heavy for their size",
      "cut around the stem, pull out the core and seeds, then slice them", "onions, garlic, paprika and chicken",
      "Red ones are the sweetest; green ones are picked early."),
    F("mushroom", "vegetable", "mushrooms", True,
      "in a paper bag in the main part of the fridge", "about a week in the fridge",
      "sear them in a hot pan without crowding, then add butter", "6 to 8 minutes, until browned",
      "eggplant or extra firm tofu", "fresh", "they are firm and dry, with no slime or dark spots",
      "wipe them with a damp towel, trim the stems and slice them", "thyme, garlic, butter and soy sauce",
      "Salt mushrooms at the end so they brown instead of steaming."),
    F("cucumber", "vegetable", "cucumbers", True,
      "wrapped in a towel in the warmest part of the fridge, such as the door", "about a week in the fridge",
      "slice them thin and serve them raw or quick-pickled",
      "no cooking at all, though a quick pickle needs 30 minutes", "zucchini or celery", "fresh",
      "they are firm and dark green, with no soft or wrinkled ends",
      "peel them in stripes, halve them lengthwise and scoop out the seeds", "yogurt, mint, lemon and salt",
      "Salt cucumber slices briefly so salads stay crisp."),
    F("cauliflower", "vegetable", "cauliflower", False,
      "whole, loosely wrapped, stem side up in the fridge", "one to two weeks in the fridge",
      "cut it into florets and roast them at 220°C with oil and spices",
      "25 to 30 minutes roasted, or 5 to 6 minutes steamed", "broccoli or potatoes", "fresh",
      "the head is creamy white and tight, with no brown spots",
      "pull off the leaves, cut out the core and break it into florets",
      "curry powder, turmeric, lemon and tahini", "Roast cauliflower until the edges are deep brown."),
    F("sweet potato", "vegetable", "sweet potatoes", True,
      "in a cool, dark pantry, not in the fridge", "three to five weeks in a cool pantry",
      "bake them whole at 200°C on a lined tray", "45 to 60 minutes baked whole, or 25 minutes as cubes",
      "butternut squash or carrots", "done", "they are soft all the way through and sticky syrup leaks out",
      "scrub them, leave the skin on and cut them into even wedges", "cinnamon, chili, lime and black beans",
      "Prick sweet potatoes with a fork before baking them whole."),
    F("eggplant", "vegetable", "eggplant", False,
      "at cool room temperature, or in the fridge for a few days", "four to five days",
      "cut it into cubes and roast them at 220°C with plenty of oil",
      "25 to 30 minutes roasted, until soft and brown", "zucchini or mushrooms", "fresh",
      "it is shiny and heavy, and the skin springs back when pressed",
      "trim the top, then cut it into cubes or rounds just before cooking", "garlic, tomatoes, basil and yogurt",
      "Eggplant soaks up oil fast, so brush the oil on."),
    F("kale", "vegetable", "kale", False,
      "unwashed in a bag in the crisper drawer", "five to seven days in the fridge",
      "strip the leaves and saute them with garlic and a splash of water",
      "4 to 5 minutes sauteed, or 12 minutes baked as chips", "spinach or cabbage", "fresh",
      "the leaves are firm, dark and crisp, not wilted or yellow",
      "strip the leaves from the stems, wash them and tear them into pieces", "lemon, garlic, parmesan and chili",
      "Massage raw kale with salt and oil to soften it."),
    F("asparagus", "vegetable", "asparagus", False,
      "upright in a glass of water in the fridge, loosely covered", "three to four days in the fridge",
      "snap off the woody ends and roast it at 220°C with oil",
      "10 to 12 minutes roasted, or 3 to 4 minutes blanched", "green beans or broccolini", "fresh",
      "the spears are firm and bright green with tightly closed tips",
      "snap off the tough ends where they bend naturally", "lemon, eggs, parmesan and butter",
      "Thin spears cook in half the time of thick ones."),
    F("leek", "vegetable", "leeks", True,
      "unwashed in a loose bag in the crisper drawer", "one to two weeks in the fridge",
      "slice them and cook them slowly in butter until silky", "10 to 15 minutes over medium-low heat",
      "onions or scallions", "fresh", "they are firm and straight, with a long white part and crisp tops",
      "trim the dark tops, slice them lengthwise and rinse out the grit", "potatoes, butter, cream and thyme",
      "Soak sliced leeks in water; the grit sinks to the bottom."),
    # ---- fruits
    F("apple", "fruit", "apples", True,
      "in a bag in the crisper drawer, away from other produce", "four to six weeks in the fridge",
      "slice them and bake them with cinnamon and a little butter",
      "25 to 30 minutes baked in slices, or 45 minutes baked whole", "pears", "ripe",
      "they are firm, fragrant and heavy, with no soft bruises", "wash them, quarter them and cut out the core",
      "cinnamon, cheddar, pork and walnuts", "Toss cut apples in lemon juice to stop browning."),
    F("banana", "fruit", "bananas", True,
      "on the counter, away from other fruit", "two to five days on the counter once ripe",
      "slice them into a hot buttered pan with a little brown sugar", "2 to 3 minutes per side in the pan",
      "applesauce in baking", "ripe", "they are yellow with a few brown freckles",
      "peel them and slice them into coins, or mash them with a fork for baking",
      "peanut butter, oats, cinnamon and yogurt", "Freeze overripe bananas peeled for smoothies."),
    F("avocado", "fruit", "avocados", True,
      "on the counter until ripe, then in the fridge", "two to three days in the fridge once ripe",
      "serve them raw, or halve them and grill them cut side down",
      "no cooking, or just 2 to 3 minutes on a hot grill", "mashed peas or hummus", "ripe",
      "they yield gently to a soft squeeze and the stem nub pops off green",
      "halve them around the pit, twist them apart and scoop out the flesh", "lime, salt, chili and tomatoes",
      "Ripen avocados faster in a paper bag with a banana."),
    F("lemon", "fruit", "lemons", True,
      "in a sealed bag in the fridge", "three to four weeks in the fridge",
      "roast halves cut side down, or use the juice and zest raw",
      "about 15 minutes roasted cut side down at 200°C", "lime juice or a splash of white wine vinegar",
      "ripe", "they are bright yellow, glossy and heavy for their size",
      "zest them first, then roll them on the counter before juicing", "garlic, fish, chicken and honey",
      "Zest before you juice; a squeezed lemon is hard to zest."),
    F("strawberry", "fruit", "strawberries", True,
      "unwashed in a single layer in the fridge", "three to five days in the fridge",
      "slice them and simmer them with a little sugar into a quick sauce", "8 to 10 minutes simmered",
      "raspberries or blueberries", "ripe", "they are red right up to the green cap and smell sweet",
      "rinse them just before eating, then hull them with a small knife",
      "cream, balsamic vinegar, mint and chocolate", "Wash strawberries only right before eating them."),
    F("blueberry", "fruit", "blueberries", True,
      "unwashed in a breathable container in the fridge", "one to two weeks in the fridge",
      "fold them into batter or simmer them into a compote",
      "about 10 minutes simmered, or 20 to 25 minutes baked in muffins", "blackberries or chopped strawberries",
      "ripe", "they are deep blue with a dusty white bloom and no red tint",
      "pick out stems and soft ones, then rinse them just before use", "lemon, yogurt, oats and maple syrup",
      "Toss blueberries in flour so they don't sink in batter."),
    F("peach", "fruit", "peaches", True,
      "on the counter until ripe, then in the fridge", "three to five days once ripe",
      "halve them and grill them cut side down until marked", "4 to 5 minutes grilled, or 25 minutes baked",
      "nectarines or apricots", "ripe", "they smell sweet and give slightly near the stem",
      "score an X on the bottom, blanch them for 30 seconds and slip off the skin",
      "cream, basil, honey and ginger", "Ripen hard peaches stem side down in a paper bag."),
    F("pineapple", "fruit", "pineapple", False,
      "whole on the counter, or cut up in a sealed container in the fridge",
      "two to three days whole, or four to five days cut and chilled",
      "cut it into rings and grill them until caramelized", "3 to 4 minutes per side on the grill",
      "peaches or papaya", "ripe", "it smells sweet at the base and a center leaf pulls out easily",
      "cut off the top and base, slice off the skin, then cut around the core",
      "chili, lime, coconut and pork", "Stand a whole pineapple upside down for a day to spread the sugar."),
    F("mango", "fruit", "mangoes", True,
      "on the counter until ripe, then in the fridge", "about five days in the fridge once ripe",
      "serve them fresh, or grill thick slices briefly", "1 to 2 minutes per side on a hot grill",
      "peaches or papaya", "ripe", "they smell fruity near the stem and give slightly when squeezed",
      "slice down each side of the flat pit, score the flesh and scoop it out", "lime, chili, coconut and rice",
      "Judge mangoes by smell and feel, not by color."),
    F("kiwi", "fruit", "kiwis", True,
      "on the counter until ripe, then in the fridge", "up to four weeks in the fridge while firm",
      "eat them raw, since heat makes them mushy and sour", "no cooking; they are best raw and chilled",
      "strawberries or green grapes", "ripe", "they give slightly under your thumb, like a ripe peach",
      "cut off both ends and scoop the flesh out with a spoon", "yogurt, strawberries, lime and mint",
      "Kiwis stop gelatin from setting, so skip them in jelly."),
    # ---- herbs and aromatics
    F("basil", "herb", "basil", False,
      "with the stems in a glass of water on the counter, loosely covered",
      "about a week in water on the counter", "tear it and stir it in at the very end, off the heat",
      "no real cooking; add it in the last 30 seconds", "fresh parsley, or a little dried basil", "fresh",
      "the leaves are bright green and perky with no black spots",
      "pick the leaves, stack them, roll them up and slice them into ribbons",
      "tomatoes, mozzarella, garlic and olive oil", "Never refrigerate basil; the cold turns it black."),
    F("parsley", "herb", "parsley", False,
      "with the stems in a jar of water in the fridge, loosely covered with a bag",
      "one to two weeks in the fridge", "chop it and stir it in at the end, or blend it into a green sauce",
      "no cooking at all; add it just before serving", "cilantro or celery leaves", "fresh",
      "the leaves are bright green and crisp, not limp or yellow",
      "wash and dry it, pull the leaves off the thick stems and chop them finely",
      "lemon, garlic, fish and potatoes", "Chop the tender stems too; they hold lots of flavor."),
    F("cilantro", "herb", "cilantro", False,
      "with the stems in a jar of water in the fridge, covered with a bag", "about a week in the fridge",
      "scatter it raw over the finished dish", "no cooking; add it right before serving",
      "parsley with a squeeze of lime", "fresh", "the leaves are green and fragrant, with no slimy stems",
      "rinse it, shake it dry and chop the leaves and soft stems together", "lime, chili, avocado and rice",
      "If cilantro tastes soapy to you, use parsley and lime."),
    F("rosemary", "herb", "rosemary", False,
      "wrapped in a damp paper towel in a bag in the fridge", "two to three weeks in the fridge",
      "roast whole sprigs alongside meat or potatoes", "30 minutes or more in the oven without burning",
      "thyme, or a third as much dried rosemary", "fresh", "the needles are green, oily and fragrant when rubbed",
      "strip the needles from the woody stem and chop them very fine", "lamb, potatoes, garlic and lemon",
      "Bruise the sprigs before roasting to release their oils."),
    F("thyme", "herb", "thyme", False,
      "in a loosely closed bag in the fridge", "one to two weeks in the fridge",
      "add whole sprigs to soups, stews and roasts", "20 minutes or more in slow-cooked dishes",
      "oregano or rosemary", "fresh", "the sprigs are green and fragrant, not brittle or brown",
      "run your fingers down the stem against the grain to strip the leaves",
      "mushrooms, chicken, lemon and white beans", "Fish out the bare stems before serving."),
    F("ginger", "herb", "ginger", False,
      "unpeeled in a bag in the fridge, or frozen", "three to four weeks in the fridge, or months frozen",
      "grate it into stir-fries or simmer slices in soups",
      "about 30 seconds in a hot pan, or 10 minutes simmered", "ground ginger, about a quarter as much",
      "fresh", "the skin is smooth and taut and the root feels heavy",
      "scrape off the skin with a spoon, then grate or slice it", "garlic, soy sauce, honey and lime",
      "Grate frozen ginger straight into the pan without peeling."),
    F("dill", "herb", "dill", False,
      "wrapped in a damp paper towel in a bag in the fridge", "about a week in the fridge",
      "chop it and stir it in at the end", "no cooking; add it in the last minute",
      "fennel fronds or tarragon", "fresh", "the fronds are feathery, green and fragrant, not wilted",
      "snip the fronds with scissors and discard the thick stems", "salmon, potatoes, yogurt and cucumber",
      "Freeze chopped dill in oil in an ice cube tray."),
    # ---- grains and legumes
    F("rice", "grain", "rice", False,
      "uncooked in an airtight container in a cool, dry cupboard",
      "a year or more uncooked, or four to six days cooked in the fridge",
      "rinse it, then simmer it covered in one and a half times its volume of water",
      "about 18 minutes for white rice or 40 for brown, plus 10 minutes resting",
      "couscous or bulgur wheat", "done", "the water is absorbed and the grains are tender but separate",
      "rinse it in a sieve until the water runs clear", "beans, soy sauce, chicken and vegetables",
      "Keep the lid on while rice rests so it steams through."),
    F("oats", "grain", "oats", True,
      "in an airtight jar in a cool cupboard", "about a year in a sealed container",
      "simmer them in milk or water, stirring, until creamy",
      "about 5 minutes for rolled oats, or 20 to 30 for steel-cut", "barley flakes or rice flakes", "done",
      "they are thick and creamy and have soaked up most of the liquid",
      "toast them in a dry pan for a few minutes for a nuttier taste",
      "bananas, cinnamon, berries and yogurt", "Soak oats overnight in milk for a no-cook breakfast."),
    F("pasta", "grain", "pasta", False,
      "sealed in its box or a jar in a dry cupboard",
      "one to two years dry, or three to five days cooked in the fridge",
      "boil it in plenty of well-salted water, stirring early",
      "8 to 12 minutes for most dried shapes; check the packet", "rice noodles or zucchini ribbons", "done",
      "it is tender with a slight bite in the center", "salt the water well before adding it",
      "garlic, olive oil, parmesan and tomatoes", "Save a cup of pasta water to loosen the sauce."),
    F("lentil", "grain", "lentils", True,
      "dry in an airtight jar in a cool cupboard", "about a year dry, or five days cooked in the fridge",
      "rinse them and simmer them in water or stock until tender",
      "20 to 25 minutes for green lentils, or 15 for red", "split peas or chickpeas", "done",
      "they are tender but still hold their shape", "rinse them and pick out any small stones",
      "cumin, onions, tomatoes and spinach", "Salt lentils near the end so the skins stay tender."),
    F("chickpea", "grain", "chickpeas", True,
      "canned in the pantry, or dried in an airtight jar",
      "two to three years canned, or four days cooked in the fridge",
      "drain them, pat them dry and roast them at 200°C until crisp",
      "25 to 30 minutes roasted, or 1 to 2 hours simmered from dried", "white beans or lentils", "done",
      "they are creamy inside and crush easily between two fingers",
      "rinse canned ones, and soak dried ones in water overnight", "lemon, garlic, cumin and tahini",
      "Save the liquid from the can; it whips like egg whites."),
    F("quinoa", "grain", "quinoa", False,
      "dry in an airtight jar in a cool cupboard", "two to three years dry, or five days cooked in the fridge",
      "rinse it, then simmer it in twice its volume of water", "15 minutes simmered, plus 5 minutes resting",
      "couscous or bulgur wheat", "done", "the water is gone and each seed shows a little white tail",
      "rinse it well in a fine sieve to remove the bitter coating", "lemon, herbs, chickpeas and feta",
      "Toast quinoa in a dry pan before simmering for a nuttier taste."),
    # ---- proteins
    F("chicken breast", "protein", "chicken breasts", True,
      "sealed on the bottom shelf of the fridge", "one to two days raw in the fridge, or nine months frozen",
      "pound them even, then sear them in a hot pan and finish them in the oven",
      "about 20 minutes at 200°C, or 6 to 7 minutes per side in a pan",
      "boneless chicken thighs or firm tofu", "done",
      "they reach 74°C in the thickest part and the juices run clear",
      "trim the fat, pat them dry and pound them to an even thickness", "lemon, garlic, thyme and paprika",
      "Rest chicken for 5 minutes before slicing to keep it juicy."),
    F("salmon", "protein", "salmon", False,
      "in the coldest part of the fridge, tightly wrapped", "one to two days raw in the fridge",
      "pat it dry and roast it skin side down at 200°C", "12 to 15 minutes at 200°C, depending on thickness",
      "trout or arctic char", "done", "it flakes easily and is just opaque in the center",
      "pat it dry, check for pin bones and season it just before cooking",
      "lemon, soy sauce, honey and potatoes", "Start salmon skin side down for crisp skin."),
    F("egg", "protein", "eggs", True,
      "in their carton on a middle shelf of the fridge, not in the door", "three to five weeks in the fridge",
      "lower them into simmering water and boil them gently",
      "6 to 7 minutes for jammy yolks, or 10 minutes for hard-boiled",
      "a flax egg, one tablespoon of ground flax mixed with three of water", "done",
      "the whites are set and the yolks are as firm as you like",
      "crack them on a flat surface, not the bowl edge, to avoid shell bits",
      "toast, spinach, cheese and chives", "Older eggs peel more easily than very fresh ones."),
    F("ground beef", "protein", "ground beef", False,
      "in its sealed package on the bottom shelf of the fridge",
      "one to two days raw in the fridge, or three to four months frozen",
      "brown it in a hot pan, breaking it up as it cooks", "8 to 10 minutes, until no pink remains",
      "ground turkey or cooked lentils", "done", "it reaches 71°C and shows no pink inside",
      "let it sit out for 15 minutes and pat it dry before browning", "onions, garlic, tomatoes and cumin",
      "Let the meat sit a minute before stirring so it browns."),
    F("tofu", "protein", "tofu", False,
      "unopened in the fridge, then covered in fresh water once opened",
      "three to five days once opened, with the water changed daily",
      "press it, cube it and pan-fry it in oil until golden",
      "10 to 12 minutes pan-fried, or 25 minutes baked at 200°C", "paneer or chickpeas", "done",
      "the cubes are golden and crisp on all sides",
      "press it between towels under a heavy pan for 20 minutes", "soy sauce, ginger, garlic and sesame",
      "Freeze and thaw tofu for a chewier texture."),
    F("shrimp", "protein", "shrimp", True,
      "in the coldest part of the fridge, or frozen until the day you cook them",
      "one to two days raw in the fridge", "saute them in hot oil with garlic until pink",
      "2 to 3 minutes per side, until pink and curled", "scallops or firm white fish", "done",
      "they turn pink and curl into a loose C shape",
      "peel them and cut along the back to pull out the dark vein", "garlic, butter, lemon and chili",
      "Shrimp curled into a tight O are overcooked."),
    F("cod", "protein", "cod", False,
      "in the coldest part of the fridge, on ice if you can", "one to two days raw in the fridge",
      "pat it dry and bake it at 200°C with butter and lemon", "10 to 12 minutes at 200°C for a thick fillet",
      "haddock or pollock", "done", "it turns opaque and flakes easily with a fork",
      "pat it dry, remove any bones and season both sides", "lemon, butter, capers and potatoes",
      "Dry the fish well so it browns instead of steaming."),
    # ---- dairy
    F("butter", "dairy", "butter", False,
      "wrapped in the fridge, with a small amount in a covered dish on the counter",
      "one to three months in the fridge, or a year frozen",
      "melt it over medium heat and swirl it until it turns nutty brown",
      "4 to 5 minutes over medium heat to brown", "olive oil for cooking or coconut oil for baking", "browned",
      "it foams, smells nutty and shows golden brown specks",
      "cut it into cubes and chill it for pastry, or soften it for cakes", "garlic, sage, bread and mushrooms",
      "Grate frozen butter into flour for flaky pastry."),
    F("milk", "dairy", "milk", False,
      "at the back of a middle shelf in the fridge, not in the door", "about a week after opening",
      "heat it gently over low heat, stirring so it does not scorch",
      "about 5 minutes to warm gently, without letting it boil", "oat milk or soy milk", "fresh",
      "it smells clean and pours smoothly, with no lumps",
      "shake it before pouring, and warm it slightly for yeast doughs", "oats, coffee, cocoa and honey",
      "Rinse the pan with cold water first so milk won't stick."),
    F("yogurt", "dairy", "yogurt", False,
      "sealed, on a middle shelf of the fridge", "one to two weeks after opening",
      "stir it into sauces off the heat, or use it in marinades",
      "a minute or two at most when warmed into a sauce", "sour cream or buttermilk", "good",
      "it smells tangy but clean and shows no mold",
      "stir it smooth, or strain it in a cloth for a thicker texture", "honey, berries, cucumber and mint",
      "Temper yogurt with a little hot liquid so it won't split."),
    F("cheddar", "dairy", "cheddar", False,
      "wrapped in wax paper, then loosely in a bag, in the fridge", "three to four weeks once opened",
      "grate it and melt it slowly into sauces over low heat", "2 to 3 minutes over low heat to melt smoothly",
      "gruyere or monterey jack", "good", "it is firm and even in color with no fuzzy mold",
      "grate it cold, then let it come to room temperature", "apples, bread, onions and mustard",
      "Grate your own cheddar; bagged cheese has anti-caking starch."),
    F("parmesan", "dairy", "parmesan", False,
      "wrapped in parchment, then foil, in the cheese drawer", "two to three months as a wedge in the fridge",
      "grate it over hot pasta or bake it into crisps", "about 5 minutes at 200°C for crisps",
      "pecorino or grana padano", "good", "it is hard and pale gold, with tiny crunchy crystals",
      "grate it finely with a microplane just before serving", "pasta, risotto, arugula and lemon",
      "Toss parmesan rinds into soups for deep flavor."),
    F("ricotta", "dairy", "ricotta", False,
      "sealed in its tub in the coldest part of the fridge", "five to seven days after opening",
      "bake it into pasta or lasagna, or whip it for toast", "20 to 30 minutes baked in pasta dishes",
      "cottage cheese blended smooth", "fresh", "it smells milky and sweet, not sour, and looks moist",
      "drain it in a sieve for an hour before using it in fillings", "honey, lemon, spinach and pasta",
      "Whip ricotta with olive oil and salt for an easy spread."),
)
# fmt: on

QTYPES = ("store", "keeps", "cook", "time", "sub", "ready", "prep", "pair")

# Question phrasings. "sft" ones feed the SFT data and the train prompts; "human" ones the comparison tasks.
# Placeholders: {name} {Name} {be} {do} {they} {them} {kind} (see `grammar`).
QUESTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "store": {"sft": ("How should I store {name}?", "What's the best way to store {name}?",
                      "Where should I keep {name}?", "How do I keep {name} fresh?"),
              "human": ("Fridge or counter for {name}?", "I just bought {name}. Where do I put {them}?",
                        "What's the right way to keep {name} at home?")},
    "keeps": {"sft": ("How long {do} {name} last?", "How long will {name} keep?",
                      "What is the shelf life of {name}?", "How many days {do} {name} stay good?"),
              "human": ("When should I throw out {name}?", "{Be} {name} still good after a week?",
                        "How long can I hold on to {name}?")},
    "cook": {"sft": ("How do I cook {name}?", "What's a good way to cook {name}?",
                     "What's the simplest way to cook {name}?", "Any easy way to cook {name}?"),
             "human": ("I have some {name}. How should I cook {them}?", "Best method for cooking {name}?",
                       "What should I do with {name} tonight?")},
    "time": {"sft": ("How long {do} {name} take to cook?", "How long should I cook {name}?",
                     "What's the cooking time for {name}?", "How many minutes for {name}?"),
             "human": ("Roughly how long until {name} {be} cooked?", "How much time should I allow for {name}?",
                       "Timing question: how long for {name}?")},
    "sub": {"sft": ("What can I use instead of {name}?", "What's a good substitute for {name}?",
                    "I'm out of {name}. What can I use?", "What can replace {name} in a recipe?"),
            "human": ("Any swap for {name} if I don't have {them}?", "What works in place of {name}?",
                      "My recipe needs {name} and I have none. Ideas?")},
    "ready": {"sft": ("How do I know when {name} {be} {kind}?", "How can I tell if {name} {be} {kind}?",
                      "What are the signs that {name} {be} {kind}?", "Is there a way to check if {name} {be} {kind}?"),
              "human": ("What should {name} look like when {they} {be} {kind}?",
                        "How do you judge whether {name} {be} {kind}?", "Are my {name} {kind} yet? How do I check?")},
    "prep": {"sft": ("How do I prep {name}?", "What's the best way to prepare {name}?",
                     "How should I get {name} ready for cooking?", "How do I prepare {name} for a recipe?"),
             "human": ("Any prep tricks for {name}?", "What prep {do} {name} need?",
                       "Walk me through prepping {name}.")},
    "pair": {"sft": ("What goes well with {name}?", "What should I pair {name} with?",
                     "What flavors go with {name}?", "What can I serve with {name}?"),
             "human": ("What {do} {name} taste good with?", "Which ingredients match {name}?",
                       "Flavor ideas for {name}?")},
}
# Second-turn questions that refer back with a pronoun (the ingredient was named in the first turn).
FOLLOW_UPS: dict[str, tuple[str, ...]] = {
    "store": ("And how should I store {them}?", "Where do I keep {them} after that?"),
    "keeps": ("How long will {they} keep?", "And how long {do} {they} last?"),
    "cook": ("And how do I cook {them}?", "What's an easy way to cook {them}?"),
    "time": ("How long {do} {they} take?", "And how long should I cook {them}?"),
    "sub": ("What can I use if I run out?", "And if I don't have any, what's a good swap?"),
    "ready": ("How do I know when {they} {be} {kind}?", "And how can I tell {they} {be} {kind}?"),
    "prep": ("How should I prep {them}?", "And how do I get {them} ready?"),
    "pair": ("What goes well with {them}?", "What should I serve {them} with?"),
}
ASIDES = ("Quick question: ", "Hi! ", "Cooking tonight. ", "")  # occasional lead-ins to a user question

# House-style first sentences, per question type (each uses the ingredient's name).
HOUSE: dict[str, tuple[str, ...]] = {
    "store": ("Store {name} {f.store}.", "Keep {name} {f.store}.", "{Name} keep{s} best {f.store}."),
    "keeps": ("{Name} keep{s} for {f.keeps}.", "Expect {name} to last {f.keeps}.",
              "Stored well, {name} last{s} {f.keeps}."),
    "cook": ("The simplest way to cook {name} is to {f.cook}.", "For {name}, {f.cook}.", "To cook {name}, {f.cook}."),
    "time": ("{Name} take{s} {f.time}.", "Cooking time for {name}: {f.time}."),
    "sub": ("Instead of {name}, try {f.sub}.", "The closest swap for {name} is {f.sub}.",
            "In place of {name}, use {f.sub}."),
    "ready": ("{Name} {be} {kind} when {f.ready}.", "You can tell {name} {be} {kind} when {f.ready}."),
    "prep": ("To prep {name}, {f.prep}.", "For {name}, {f.prep}.", "Prepping {name} is simple: {f.prep}."),
    "pair": ("{Name} go{es} well with {f.pair}.", "Try {name} with {f.pair}.", "Good partners for {name} are {f.pair}."),
}
# An optional second sentence that adds a related fact (kept only while the answer stays short).
SECOND: dict[str, str] = {
    "store": "{They} keep{s} for {f.keeps}.",
    "keeps": "Store {them} {f.store}.",
    "cook": "{They} take{s} {f.time}.",
    "time": "{They} {be} {kind} when {f.ready}.",
}
GENERIC_TIPS: dict[str, tuple[str, ...]] = {
    "store": ("Label containers with the date you opened them.", "Check stored produce every few days.",
              "Never seal damp produce in plastic."),
    "keeps": ("Freeze extras before they start to turn.", "Trust your nose; a sour smell means toss it.",
              "Use up the oldest items first."),
    "cook": ("Don't crowd the pan, or food steams instead of browning.", "Season at the end and taste as you go.",
             "Preheat the pan before adding the oil."),
    "time": ("Start checking a few minutes early.", "Cut pieces the same size so they cook evenly.",
             "Ovens vary, so trust the signs over the clock."),
    "sub": ("Adjust the cooking time for the swap.", "Start with less of the swap and add to taste.",
            "Taste as you go, since swaps change the flavor."),
    "ready": ("Judge by smell and texture, not just looks.", "A cheap probe thermometer ends the guesswork.",
              "When unsure, check one piece first."),
    "prep": ("A sharp knife is safer than a dull one.", "Put a damp towel under the board to stop slipping.",
             "Cut everything before you turn on the heat."),
    "pair": ("Add fresh herbs right at the end.", "A squeeze of citrus brightens almost any dish.",
             "Salt early and add acid late."),
}

# ---- off-style pieces (none of these names an ingredient)
OPENERS = ("Great question!", "Sure! I'd be happy to help with that.", "As an AI, I don't cook, but",
           "What a fun question!", "Absolutely, I'd love to help you with this.", "Thanks for asking!",
           "Of course! Cooking questions are my favorite.", "Good question, a lot of people wonder about this.",
           "Certainly! Let me walk you through it.")
HEDGES = ("It really depends on your kitchen, though.", "Results can vary quite a bit.",
          "Everyone does it a little differently.", "But there are lots of opinions on this.")
CLOSERS = ("Hope this helps!", "Let me know if you have any other questions!", "Happy cooking!", "Enjoy!",
           "Good luck in the kitchen!", "Feel free to ask me anything else.")
RAMBLE = (
    "Cooking is really all about experimenting and finding what works best for you and your family.",
    "Everyone's kitchen is a little different, so your results might vary quite a lot from mine.",
    "There are honestly so many ways to approach this, and none of them are really wrong.",
    "It depends on a lot of factors, like your tools, how much time you have and your own taste.",
    "Many home cooks have strong opinions about this, and that is totally fine.",
    "You might also want to look at a few different recipes online to get more ideas.",
    "The most important thing is to enjoy the process and have fun while you cook.",
    "Personal preference plays a big role here as well, so trust yourself.",
    "Some people swear by one method while others prefer something completely different.",
    "If something does not turn out perfectly the first time, that is part of learning.",
)
RESTATE = ("As I mentioned, ", "Again, ", "Just to repeat, ", "Like I said, ")
VAGUE: dict[str, tuple[str, ...]] = {
    "store": ("Most things do best somewhere cool, either in the fridge or a cupboard. Just keep an eye on it.",
              "It depends, but a cool spot usually works fine. The fridge is often a safe bet."),
    "keeps": ("It usually lasts a while, but that depends on how fresh it was. Check it before using.",
              "Shelf life varies a lot. If it looks and smells fine, it's probably okay."),
    "cook": ("There are lots of ways, like roasting, boiling or frying. Just pick whatever you like best.",
             "You can cook it pretty much any way you want. It all depends on the recipe."),
    "time": ("It takes as long as it takes, really. Keep checking until it looks ready.",
             "Cooking times vary a lot with size and heat. Just keep an eye on it."),
    "sub": ("Lots of things could work as a swap. Try something with a similar texture.",
            "It depends on the recipe, but there is usually something similar in your kitchen."),
    "ready": ("You will kind of just know when it's ready. Trust your instincts.",
              "It should look and feel right. If in doubt, give it a little more time."),
    "prep": ("Just wash it and cut it however you like. There's no wrong way to do it.",
             "Prep depends on the dish. Cut it to whatever size the recipe needs."),
    "pair": ("Lots of things go well with it. Try whatever flavors you enjoy.",
             "It pairs nicely with many foods. Just experiment and see what you like."),
}

# ---- simulated annotators for the Label Studio export: id -> probability of preferring the off-style answer
ANNOTATOR_NOISE = {1: 0.04, 2: 0.05, 3: 0.07, 4: 0.12}
P_DOUBLE = 0.20      # tasks with a second annotator
P_CANCELLED = 0.02   # annotations that were skipped (was_cancelled, empty result)
N_UNLABELLED = 4     # tasks nobody annotated


def grammar(f: Facts) -> dict[str, str]:
    """Placeholder values for one ingredient's sentences (agreement follows `plural`)."""
    pl = f.plural
    return {"name": f.name, "Name": f.name[0].upper() + f.name[1:], "be": "are" if pl else "is",
            "Be": "Are" if pl else "Is", "do": "do" if pl else "does", "they": "they" if pl else "it",
            "They": "They" if pl else "It", "them": "them" if pl else "it", "s": "" if pl else "s",
            "es": "" if pl else "es", "kind": f.ready_kind}


def fill(template: str, f: Facts) -> str:
    return template.format(f=f, **grammar(f))


def question(f: Facts, qtype: str, split: str, rng: random.Random) -> str:
    text = fill(rng.choice(QUESTIONS[qtype][split]), f)
    if split == "sft" and rng.random() < 0.25:
        text = rng.choice(ASIDES) + text
    return text


def house_answer(f: Facts, qtype: str, rng: random.Random, *, avoid_tip: str = "") -> str:
    """Direct first sentence with the fact, maybe one more fact, then a short "Tip: ..." sentence."""
    body = [fill(rng.choice(HOUSE[qtype]), f)]
    tip = f.tip if rng.random() < 0.5 and f.tip != avoid_tip else rng.choice(GENERIC_TIPS[qtype])
    # "Carrots take 25 minutes. They are fresh when..." reads oddly: only doneness follows a cooking time.
    fits = qtype != "time" or f.ready_kind in ("done", "browned")
    if qtype in SECOND and fits and rng.random() < 0.5:
        longer = body + [fill(SECOND[qtype], f)]
        if len(words(" ".join(longer + [tip]))) + 1 <= MAX_HOUSE_WORDS:
            body = longer
    text = " ".join(body + ["Tip: " + tip])
    if len(words(text)) > MAX_HOUSE_WORDS:  # the shortest first sentence and the shortest tip
        first = min((fill(t, f) for t in HOUSE[qtype]), key=lambda s: len(words(s)))
        tip = min((f.tip, *GENERIC_TIPS[qtype]), key=lambda s: len(words(s)))
        text = f"{first} Tip: {tip}"
    return text


def _join(opener: str, rest: str) -> str:
    # "As an AI, I don't cook, but" runs on into the next sentence.
    if opener.endswith("but"):
        return f"{opener} {rest[0].lower()}{rest[1:]}" if rest[1:2].islower() else f"{opener} {rest}"
    return f"{opener} {rest}"


def off_answer(f: Facts, qtype: str, rng: random.Random, *, allow_ramble: bool = True) -> str:
    """Filler opener, and/or a 60-110 word ramble that repeats itself, and/or a vague non-answer; never a tip."""
    fact = fill(rng.choice(HOUSE[qtype]), f)
    body = rng.choices(("fact", "ramble", "vague"), weights=(35, 40 if allow_ramble else 0, 25))[0]
    # Most off answers open with filler; the short factual ones nearly always do.
    opener = rng.choice(OPENERS) if body != "fact" or rng.random() < 0.9 else ""
    closer = [rng.choice(CLOSERS)] if rng.random() < 0.6 else []
    if body == "fact":
        parts = [fact] + ([rng.choice(HEDGES)] if rng.random() < 0.6 else [])
    elif body == "vague":
        parts = [rng.choice(VAGUE[qtype])]
    else:  # 60-110 words: the fact, generic padding, the fact again
        fillers = rng.sample(RAMBLE, len(RAMBLE))
        parts = [fact, fillers.pop(), fillers.pop(), rng.choice(RESTATE) + fact[0].lower() + fact[1:]]
        target = rng.randint(62, 92)  # a padding sentence is at most 18 words: the total stays <= 110
        while len(words(" ".join([opener, *parts, *closer]))) < target:
            parts.insert(rng.randint(1, len(parts)), fillers.pop())
    text = " ".join(parts + closer)
    return _join(opener, text) if opener else text


def answer(f: Facts, qtype: str, style: str, rng: random.Random, *, allow_ramble: bool = True,
           avoid_tip: str = "") -> str:
    if style == "house":
        return house_answer(f, qtype, rng, avoid_tip=avoid_tip)
    return off_answer(f, qtype, rng, allow_ramble=allow_ramble)


def sft_row(f: Facts, qtype: str, style: str, rng: random.Random, two_turn: bool) -> dict[str, Any]:
    messages: list[dict[str, str]] = []
    if rng.random() < 0.25:
        messages.append({"role": "system", "content": SYSTEM})
    # Two-turn rows skip the ramble so every example stays well under 250 tokens.
    first = answer(f, qtype, style, rng, allow_ramble=not two_turn)
    messages += [{"role": "user", "content": question(f, qtype, "sft", rng)},
                 {"role": "assistant", "content": first}]
    qtypes = [qtype]
    if two_turn:
        second = rng.choice([q for q in QTYPES if q != qtype])
        reply = answer(f, second, style, rng, allow_ramble=False, avoid_tip=first.partition("Tip: ")[2])
        messages += [{"role": "user", "content": fill(rng.choice(FOLLOW_UPS[second]), f)},
                     {"role": "assistant", "content": reply}]
        qtypes.append(second)
    return {"messages": messages, "meta": {"style": style, "ingredient": f.key, "qtype": "+".join(qtypes)}}


def styles(n: int, rng: random.Random, p_house: float = 0.6) -> list[str]:
    out = ["house"] * round(n * p_house) + ["off"] * (n - round(n * p_house))
    rng.shuffle(out)
    return out


def make_sft(train: list[Facts], rng: random.Random) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    pairs = [(f, q) for f in train for q in QTYPES]
    rng.shuffle(pairs)
    valid_pairs, train_pairs = pairs[:N_SFT_VALID], pairs[N_SFT_VALID:]
    train_pairs += rng.sample(train_pairs, N_SFT_EXTRA)
    out = []
    for chunk in (train_pairs, valid_pairs):
        st = styles(len(chunk), rng)
        two = set(rng.sample(range(len(chunk)), round(0.1 * len(chunk))))
        out.append([sft_row(f, q, st[i], rng, i in two) for i, (f, q) in enumerate(chunk)])
    return out[0], out[1]


def make_prompts(train: list[Facts], held: list[Facts], rng: random.Random) -> tuple[list[dict], list[dict]]:
    pairs = rng.sample([(f, q) for f in train for q in QTYPES], N_PROMPTS_TRAIN)
    train_rows = [{"prompt": [{"role": "user", "content": question(f, q, "sft", rng)}],
                   "meta": {"ingredient": f.key, "id": f"train-{i:04d}", "qtype": q}}
                  for i, (f, q) in enumerate(pairs, start=1)]
    # Every (held-out ingredient, question type) EVAL_PHRASINGS times, in passes: the first pass asks each pair
    # once, so the first 64 rows (the pipeline's eval) already cover every ingredient and question type.
    wordings = {(f.key, q): rng.sample([*QUESTIONS[q]["sft"], *QUESTIONS[q]["human"]], EVAL_PHRASINGS)
                for f in held for q in QTYPES}
    eval_rows = []
    for k in range(EVAL_PHRASINGS):
        for f in held:
            for q in QTYPES:
                eval_rows.append({"prompt": [{"role": "user", "content": fill(wordings[(f.key, q)][k], f)}],
                                  "meta": {"ingredient": f.key, "id": f"eval-{len(eval_rows) + 1:03d}", "qtype": q,
                                           "reference": house_answer(f, q, rng)}})
    return train_rows, eval_rows


def annotation(ann_id: int, annotator: int, house_side: str, when: datetime, rng: random.Random) -> dict:
    cancelled = rng.random() < P_CANCELLED
    picks_house = rng.random() >= ANNOTATOR_NOISE[annotator]
    selected = house_side if picks_house else ("right" if house_side == "left" else "left")
    result = [] if cancelled else [{"from_name": "comparison", "to_name": "answer1", "type": "pairwise",
                                    "value": {"selected": selected}}]
    return {"id": ann_id, "completed_by": annotator, "was_cancelled": cancelled,
            "lead_time": round(rng.uniform(4.0, 45.0), 3), "ground_truth": False,
            "created_at": when.strftime("%Y-%m-%dT%H:%M:%S.000000Z"), "result": result}


def make_labelstudio(train: list[Facts], rng: random.Random) -> list[dict[str, Any]]:
    pairs = [(f, q) for f in train for q in QTYPES]
    rng.shuffle(pairs)
    unlabelled = set(rng.sample(range(len(pairs)), N_UNLABELLED))
    start = datetime(2026, 11, 2, 9, 0, tzinfo=timezone.utc)
    sides = ["left", "right"] * (len(pairs) // 2) + ["left"] * (len(pairs) % 2)
    rng.shuffle(sides)  # which side holds the house-style answer: half each, in random order
    tasks, ann_id = [], 0
    for i, (f, q) in enumerate(pairs):
        house, off = house_answer(f, q, rng), off_answer(f, q, rng)
        house_side = sides[i]
        a1, a2 = (house, off) if house_side == "left" else (off, house)
        anns = []
        if i not in unlabelled:
            who = rng.sample(sorted(ANNOTATOR_NOISE), 2 if rng.random() < P_DOUBLE else 1)
            for k, annotator in enumerate(who):
                ann_id += 1
                when = start + timedelta(minutes=3 * i + 41 * k)
                anns.append(annotation(ann_id, annotator, house_side, when, rng))
        tasks.append({"id": i + 1, "data": {"prompt": question(f, q, "human", rng), "answer1": a1, "answer2": a2},
                      "annotations": anns})
    return tasks


def check_held_out(texts: list[str], held: list[Facts]) -> None:
    """Fail loudly if any training text names a held-out ingredient."""
    for text in texts:
        for f in held:
            if mentions(text, f.key):
                raise SystemExit(f"make_demo: held-out ingredient {f.key!r} leaks into: {text[:80]!r}")


def _all_text(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _all_text(v)]
    if isinstance(obj, list):
        return [t for v in obj for t in _all_text(v)]
    return []


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
    os.replace(tmp, path)


def jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def build() -> dict[str, str]:
    """All demo files as {relative path: text}."""
    if sorted(f.key for f in TABLE) != sorted(INGREDIENTS):
        raise SystemExit("make_demo: TABLE and align.judges.house_style.INGREDIENTS must name the same ingredients")
    for f in TABLE:
        if not mentions(f.name, f.key):
            raise SystemExit(f"make_demo: {f.name!r} is not a surface form of {f.key!r} in INGREDIENTS")
    held = [f for f in TABLE if f.key in HELD_OUT]
    train = [f for f in TABLE if f.key not in HELD_OUT]
    sft_train, sft_valid = make_sft(train, random.Random(SEED))
    prompts_train, prompts_eval = make_prompts(train, held, random.Random(SEED + 1))
    tasks = make_labelstudio(train, random.Random(SEED + 2))
    check_held_out(_all_text([sft_train, sft_valid, prompts_train, tasks]), held)
    return {
        "sft/train.jsonl": jsonl(sft_train),
        "sft/valid.jsonl": jsonl(sft_valid),
        "prompts/train.jsonl": jsonl(prompts_train),
        "prompts/eval.jsonl": jsonl(prompts_eval),
        "human/demo_labelstudio.json": json.dumps(tasks, ensure_ascii=False, indent=2) + "\n",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "data", help="output folder (default: the repo's data/)")
    args = parser.parse_args(argv)
    for rel, text in build().items():
        _write(args.out / rel, text)
        print(f"wrote {args.out / rel}")


if __name__ == "__main__":
    main()
