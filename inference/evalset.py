# ruff: noqa: RUF001  (full-width punctuation is part of the CJK test texts)
"""A small multilingual query/passage set for checking that a model variant retrieves like fp32.

Thirty pairs on distinct topics in fifteen languages; each query's answer is its own passage.
Used by ``models verify``, the variant comparison and the tests.
"""

from __future__ import annotations

import numpy as np

PAIRS: tuple[tuple[str, str], ...] = (
    ("how much protein should an adult eat per day",
     "Adults are advised to eat about 0.8 grams of protein per kilogram of body weight each day."),
    ("what causes the tides in the ocean",
     "Tides are caused mainly by the gravitational pull of the Moon on the Earth's oceans."),
    ("how do I reset a forgotten email password",
     "To recover your account, click 'Forgot password' on the sign-in page and follow the link we email you."),
    ("Wie hoch ist die Zugspitze?",
     "Die Zugspitze ist mit 2962 Metern der höchste Berg Deutschlands."),
    ("Wann wurde die Berliner Mauer geöffnet?",
     "Am 9. November 1989 öffnete die DDR die Grenzübergänge der Berliner Mauer."),
    ("Quelle est la capitale de l'Australie ?",
     "Canberra est la capitale fédérale de l'Australie, choisie comme compromis entre Sydney et Melbourne."),
    ("Comment faire une pâte à crêpes ?",
     "Mélangez la farine, les œufs et le lait, ajoutez une pincée de sel et laissez reposer la pâte une heure."),
    ("¿Cuántos jugadores tiene un equipo de fútbol en el campo?",
     "Cada equipo de fútbol juega con once jugadores en el campo, incluido el portero."),
    ("¿Por qué el cielo es azul?",
     "La luz azul del sol se dispersa más en la atmósfera que la roja, por eso vemos el cielo azul."),
    ("Chi ha dipinto la Gioconda?",
     "La Gioconda è un dipinto a olio di Leonardo da Vinci, conservato al Louvre di Parigi."),
    ("Qual é o maior rio do Brasil?",
     "O rio Amazonas é o maior rio do Brasil e o mais volumoso do mundo."),
    ("Hoeveel inwoners heeft Amsterdam?",
     "Amsterdam telt ongeveer 920.000 inwoners en is de hoofdstad van Nederland."),
    ("Сколько длится полёт до Луны?",
     "Экипаж «Аполлона-11» добрался до Луны примерно за три дня."),
    ("Как сварить гречневую кашу?",
     "Промойте гречку, залейте водой в пропорции один к двум и варите на медленном огне двадцать минут."),
    ("Jak długo gotować jajko na twardo?",
     "Jajko na twardo gotuje się około dziesięciu minut od momentu zagotowania wody."),
    ("如何学习编程？",
     "学习编程最好从一门简单的语言开始，例如Python，并且每天动手写代码。"),
    ("长城有多长？",
     "根据国家文物局的测量，明长城的总长度约为8851千米。"),
    ("富士山の高さはどのくらいですか？",
     "富士山は標高3776メートルで、日本で一番高い山です。"),
    ("日本の新幹線はいつ開業しましたか？",
     "東海道新幹線は1964年の東京オリンピックに合わせて開業しました。"),
    ("김치는 어떻게 만들어요?",
     "배추를 소금에 절인 뒤 고춧가루, 마늘, 젓갈로 만든 양념을 버무려 김치를 담급니다."),
    ("ما هي عاصمة مصر؟",
     "القاهرة هي عاصمة جمهورية مصر العربية وأكبر مدنها."),
    ("كم عدد أيام السنة الكبيسة؟",
     "السنة الكبيسة تتكون من ثلاثمائة وستة وستين يوما، ويضاف اليوم إلى شهر فبراير."),
    ("भारत का राष्ट्रीय पशु कौन सा है?",
     "बाघ भारत का राष्ट्रीय पशु है, जिसे 1973 में यह दर्जा मिला।"),
    ("योग करने के क्या फायदे हैं?",
     "नियमित योग करने से शरीर लचीला बनता है और तनाव कम होता है।"),
    ("Türkiye'nin başkenti neresidir?",
     "Ankara, 1923'ten beri Türkiye Cumhuriyeti'nin başkentidir."),
    ("Hur lagar man kanelbullar?",
     "Kanelbullar bakas av vetedeg som fylls med smör, socker och kanel och gräddas i ugnen."),
    ("how does a vaccine train the immune system",
     "A vaccine exposes the immune system to a harmless piece of a pathogen so it learns to make antibodies."),
    ("best way to store fresh basil",
     "Keep fresh basil stems in a glass of water at room temperature, loosely covered with a plastic bag."),
    ("Was kostet ein Deutschlandticket?",
     "Das Deutschlandticket gilt bundesweit im Nahverkehr und kostet als Abonnement einen festen Monatspreis."),
    ("Combien de temps faut-il pour traverser la Manche en ferry ?",
     "La traversée en ferry entre Calais et Douvres dure environ une heure et demie."),
)


def queries() -> list[str]:
    return [f"query: {q}" for q, _ in PAIRS]


def passages() -> list[str]:
    return [f"passage: {p}" for _, p in PAIRS]


def top1(query_vectors: np.ndarray, passage_vectors: np.ndarray) -> np.ndarray:
    """Index of the best passage for each query (vectors are L2-normalised)."""
    return np.argmax(query_vectors @ passage_vectors.T, axis=1)
