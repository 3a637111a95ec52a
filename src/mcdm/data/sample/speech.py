"""Speech for talkingface-wild-mini: eSpeak NG (the library in ``espeakng-loader``) through ctypes.

eSpeak NG is a formant synthesiser: real phonemisation rules and lexicons for each language, and
a phoneme event stream (name + sample position) beside the waveform. We use both: the waveform is
the sample video's audio track, and the phoneme timing shapes the mouth opening together with the
loudness envelope, so lip sync in the sample data is learnable and measurable.

The library keeps global state: its noise generator (breathy voice variants) is seeded before each
utterance, but the waveform also depends on everything synthesised before in the process
(oscillator phases, filter memories, which ``espeak_Terminate`` does not reset).
:func:`synthesize_fresh` therefore makes all speech of a dataset in one newly spawned process, in a
fixed order, so a given list of requests always gives the same audio.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy.signal import resample_poly

LANGUAGES = ("en", "fr", "es", "de", "pt", "ru", "ar", "cmn", "ja", "ko")
AUDIO_RATE = 16_000

# Sentences written for this project (about talking faces, memory and long videos).
SENTENCES: dict[str, tuple[str, ...]] = {
    "en": (
        "Every frame remembers the one before it, so the face stays the same person.",
        "We read the audio first, and then the lips follow the sound.",
        "A long video is only a chain of short clips that share a memory.",
        "Please look at the camera and tell me about your morning.",
        "The model learns motion from many people speaking in many places.",
        "Small errors add up over minutes, unless the past is kept in mind.",
        "Open your mouth a little wider on the vowels, and pause between words.",
        "This sample was made on a small computer, in a few minutes.",
    ),
    "fr": (
        "Chaque image se souvient de la précédente, et le visage reste le même.",
        "Nous écoutons d'abord la voix, puis les lèvres suivent le son.",
        "Une longue vidéo n'est qu'une suite de courts extraits qui partagent une mémoire.",
        "Regardez la caméra et racontez-moi votre matinée, s'il vous plaît.",
        "Le modèle apprend le mouvement de nombreuses personnes qui parlent.",
        "Les petites erreurs s'accumulent au fil des minutes.",
    ),
    "es": (
        "Cada imagen recuerda la anterior, así que la cara sigue siendo la misma.",
        "Primero escuchamos la voz y después los labios siguen el sonido.",
        "Un video largo es una cadena de clips cortos que comparten memoria.",
        "Por favor, mire a la cámara y cuénteme cómo fue su mañana.",
        "El modelo aprende el movimiento de muchas personas que hablan.",
        "Los pequeños errores se acumulan con los minutos.",
    ),
    "de": (
        "Jedes Bild erinnert sich an das vorige, damit das Gesicht dieselbe Person bleibt.",
        "Zuerst hören wir die Stimme, dann folgen die Lippen dem Klang.",
        "Ein langes Video ist eine Kette kurzer Clips mit gemeinsamem Gedächtnis.",
        "Bitte schauen Sie in die Kamera und erzählen Sie von Ihrem Morgen.",
        "Das Modell lernt Bewegungen von vielen sprechenden Menschen.",
        "Kleine Fehler summieren sich über viele Minuten.",
    ),
    "pt": (
        "Cada quadro lembra o anterior, e o rosto continua sendo a mesma pessoa.",
        "Primeiro ouvimos a voz, depois os lábios acompanham o som.",
        "Um vídeo longo é uma cadeia de clipes curtos que dividem uma memória.",
        "Por favor, olhe para a câmera e conte como foi a sua manhã.",
        "O modelo aprende o movimento de muitas pessoas falando.",
        "Pequenos erros se acumulam ao longo dos minutos.",
    ),
    "ru": (
        "Каждый кадр помнит предыдущий, и лицо остаётся тем же человеком.",
        "Сначала мы слушаем голос, а потом губы следуют за звуком.",
        "Длинное видео это цепочка коротких отрывков с общей памятью.",
        "Пожалуйста, посмотрите в камеру и расскажите о своём утре.",
        "Модель учится движению у многих говорящих людей.",
        "Маленькие ошибки накапливаются за несколько минут.",
    ),
    "ar": (
        "كل صورة تتذكر الصورة التي قبلها، فيبقى الوجه هو نفس الشخص.",
        "نسمع الصوت أولا، ثم تتبع الشفاه الكلام.",
        "الفيديو الطويل سلسلة من مقاطع قصيرة تشترك في ذاكرة واحدة.",
        "من فضلك انظر إلى الكاميرا واحك لي عن صباحك.",
        "يتعلم النموذج الحركة من أشخاص كثيرين يتكلمون.",
        "الأخطاء الصغيرة تتراكم مع مرور الدقائق.",
    ),
    "cmn": (
        "每一帧都记得前一帧，所以这张脸一直是同一个人。",
        "我们先听声音，然后嘴唇跟着声音动。",
        "长视频就是一串共享记忆的短片段。",
        "请看着镜头，跟我说说你今天早上做了什么。",
        "模型从很多说话的人身上学习动作。",
        "小错误会在几分钟里慢慢积累。",
    ),
    "ja": (
        "まいにち、かめらのまえで、すこしずつ、はなしてみましょう。",
        "さきに、こえをきいて、それから、くちびるが、うごきます。",
        "ながいびでおは、みじかいくりっぷの、つながりです。",
        "かめらをみて、けさのことを、おしえてください。",
        "もでるは、たくさんのひとの、うごきをまなびます。",
        "ちいさなまちがいは、すこしずつ、ふえていきます。",
    ),
    "ko": (
        "모든 장면은 앞 장면을 기억하고, 얼굴은 같은 사람으로 남습니다.",
        "먼저 목소리를 듣고, 그 다음에 입술이 소리를 따라갑니다.",
        "긴 영상은 기억을 나누는 짧은 장면들의 연결입니다.",
        "카메라를 보고 오늘 아침 이야기를 해 주세요.",
        "모델은 말하는 많은 사람들에게서 움직임을 배웁니다.",
        "작은 실수는 몇 분 동안 조금씩 쌓입니다.",
    ),
}

# eSpeak voice variants (files in espeak-ng-data/voices/!v): a "voice" for each identity
VOICE_VARIANTS = ("f1", "f2", "f3", "f4", "m1", "m2", "m3", "m4", "f5", "m5")

_EV_LIST_TERMINATED, _EV_PHONEME = 0, 7
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_CHARS_UTF8, _POS_CHARACTER = 1, 1
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE = 1, 3, 4


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):  # espeak_EVENT (speak_lib.h)
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass
class Utterance:
    audio: np.ndarray  # float32 mono at AUDIO_RATE
    phonemes: list[tuple[float, str]]  # (start time s, eSpeak phoneme mnemonic)


class ESpeak:
    """One eSpeak NG instance per process (the C library is a singleton)."""

    _lock = threading.Lock()
    _instance: "ESpeak | None" = None

    def __init__(self) -> None:
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.rate = self.lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), _INITIALIZE_PHONEME_EVENTS
        )
        if self.rate <= 0:
            raise RuntimeError("eSpeak NG failed to initialise (espeakng-loader data path?)")
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, str]] = []
        self._callback = _CALLBACK(self._on_synth)  # keep a reference: the C side holds the pointer
        self.lib.espeak_SetSynthCallback(self._callback)

    @classmethod
    def get(cls) -> "ESpeak":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _on_synth(self, wav, n, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).astype(np.int16, copy=True))
        i = 0
        while events[i].type != _EV_LIST_TERMINATED:
            ev = events[i]
            if ev.type == _EV_PHONEME:
                self._events.append((int(ev.sample), ev.id.string.decode("ascii", "replace")))
            i += 1
        return 0

    def synth(self, text: str, language: str, variant: str = "", rate_wpm: int = 165, pitch: int = 50,
              seed: int = 0) -> Utterance:
        """Synthesise ``text``; audio at AUDIO_RATE and phoneme onsets in seconds.

        ``seed`` seeds eSpeak's noise generator (breathy voice variants draw from it).
        """
        if language not in LANGUAGES:
            raise ValueError(f"language {language!r} not in {LANGUAGES}")
        with self._lock:
            self.lib.espeak_ng_SetRandSeed(ctypes.c_long(int(seed)))
            voice = f"{language}+{variant}" if variant else language
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise RuntimeError(f"eSpeak NG has no voice {voice!r}")
            self.lib.espeak_SetParameter(_PARAM_RATE, int(rate_wpm), 0)
            self.lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
            self.lib.espeak_SetParameter(_PARAM_RANGE, 60, 0)
            self._chunks, self._events = [], []
            data = text.encode("utf-8")
            err = self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            self.lib.espeak_Synchronize()
            if err != 0:
                raise RuntimeError(f"eSpeak NG synthesis failed ({err}) for {language}: {text[:40]!r}")
            pcm = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
            events = list(self._events)
        audio = resample_poly(pcm.astype(np.float32) / 32768.0, AUDIO_RATE, self.rate).astype(np.float32)
        phonemes = [(s / self.rate, name) for s, name in events]
        return Utterance(audio=audio, phonemes=phonemes)


@dataclass
class Speech:
    """A speech track made of sentences and pauses, with what it says and its phoneme timing."""

    audio: np.ndarray  # float32 mono at AUDIO_RATE, exactly the requested duration
    phonemes: list[tuple[float, str]]
    text: str
    language: str


def speak_for(duration: float, language: str, rng: np.random.Generator, variant: str = "",
              pitch: int = 50) -> Speech:
    """Fill ``duration`` seconds with sentences of ``language`` separated by short pauses.

    The last sentence is cut at the end (with a 30 ms fade), as a real clip cut from a longer
    recording would be.
    """
    engine = ESpeak.get()
    n = int(round(duration * AUDIO_RATE))
    parts: list[np.ndarray] = []
    phonemes: list[tuple[float, str]] = []
    texts: list[str] = []
    t = float(rng.uniform(0.15, 0.5))
    parts.append(np.zeros(int(t * AUDIO_RATE), np.float32))
    order = rng.permutation(len(SENTENCES[language]))
    k = 0
    while t < duration:
        text = SENTENCES[language][order[k % len(order)]]
        k += 1
        utt = engine.synth(text, language, variant, rate_wpm=int(rng.integers(150, 185)), pitch=pitch,
                           seed=int(rng.integers(2**31)))
        peak = float(np.abs(utt.audio).max()) or 1.0
        parts.append(utt.audio * (0.6 / peak))
        phonemes.extend((t + s, p) for s, p in utt.phonemes if t + s < duration)
        texts.append(text)
        t += len(utt.audio) / AUDIO_RATE
        pause = float(rng.uniform(0.25, 0.7))
        parts.append(np.zeros(int(pause * AUDIO_RATE), np.float32))
        t += pause
    audio = np.concatenate(parts)[:n]
    audio = np.pad(audio, (0, n - len(audio)))
    fade = int(0.03 * AUDIO_RATE)
    audio[-fade:] *= np.linspace(1, 0, fade, dtype=np.float32)
    return Speech(audio=audio.astype(np.float32), phonemes=phonemes, text=" ".join(texts), language=language)


@dataclass(frozen=True)
class SpeechRequest:
    duration: float
    language: str
    seed: int
    variant: str = ""
    pitch: int = 50


def synthesize_many(requests: list[SpeechRequest]) -> list[Speech]:
    """Synthesise the requests in order, in this process."""
    return [speak_for(r.duration, r.language, np.random.default_rng(r.seed), r.variant, r.pitch) for r in requests]


def synthesize_fresh(requests: list[SpeechRequest]) -> list[Speech]:
    """Synthesise the requests in order in a newly spawned process (reproducible audio)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(synthesize_many, list(requests)).result()


# ---------------------------------------------------------------------------------------------
# envelope and mouth opening


def envelope(audio: np.ndarray, n_frames: int, fps: float = 25.0, rate: int = AUDIO_RATE) -> np.ndarray:
    """Per-video-frame loudness in [0, 1]: RMS over each frame's 1/fps window, in dB above -45 dBFS.

    ``env_f = clip((20 log10 rms_f + 45) / 30, 0, 1)``; independent of absolute level only up to
    that fixed scale, so the same audio always gives the same envelope.
    """
    hop = rate / fps
    out = np.zeros(n_frames, np.float32)
    for f in range(n_frames):
        a = audio[int(round(f * hop)) : int(round((f + 1) * hop))]
        if a.size:
            rms = float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))
            out[f] = (20 * np.log10(rms + 1e-9) + 45) / 30
    return np.clip(out, 0, 1)


_VOWELS = set("aAeEiIoOuUyY@3V&0")
_OPEN = {"a": 1.0, "A": 1.0, "&": 0.9, "V": 0.8, "e": 0.65, "E": 0.75, "o": 0.7, "O": 0.8, "@": 0.5, "3": 0.55,
         "0": 0.75, "i": 0.4, "I": 0.45, "u": 0.35, "U": 0.4, "y": 0.35, "Y": 0.4}
_CLOSED = set("pbmfvw")  # lips closed or nearly (bilabials, labiodentals, rounding glide)


def viseme_openness(name: str) -> float:
    """How open the mouth is for one eSpeak phoneme mnemonic (0 closed .. 1 wide open)."""
    core = name.lstrip("'\",%=_:;!").strip()
    if not core or name.startswith("_"):
        return 0.0
    c = core[0]
    if c in _CLOSED:
        return 0.0
    if c in _VOWELS:
        return _OPEN.get(c, 0.6)
    return 0.2  # other consonants: jaw mostly up


def mouth_opening(speech: Speech, n_frames: int, fps: float = 25.0) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth mouth opening in [0, 1] per frame, and the speech envelope it came from.

    ``mouth_f = smooth( gate(env_f) * (0.15 + 0.85 * viseme_f) )`` with ``gate`` a smoothstep of the
    envelope from 0.25 to 0.65: loudness opens the jaw, the phoneme held at the frame (from each
    eSpeak onset to the next) sets how wide, and closes the lips on bilabials and between
    syllables; a 3-tap smoothing stands in for the jaw's inertia.
    """
    env = envelope(speech.audio, n_frames, fps)
    vis = np.zeros(n_frames, np.float32)
    times = np.arange(n_frames, dtype=np.float64) / fps + 0.5 / fps
    if speech.phonemes:
        onsets = np.array([t for t, _ in speech.phonemes])
        values = np.array([viseme_openness(p) for _, p in speech.phonemes], np.float32)
        idx = np.searchsorted(onsets, times, side="right") - 1
        vis = np.where(idx >= 0, values[np.clip(idx, 0, None)], 0.0).astype(np.float32)
    gate = np.clip((env - 0.25) / 0.4, 0, 1)
    gate = gate * gate * (3 - 2 * gate)
    mouth = gate * (0.15 + 0.85 * vis)
    mouth = np.convolve(np.pad(mouth, 1, mode="edge"), np.float32([0.25, 0.5, 0.25]), mode="valid")
    return np.clip(mouth, 0, 1).astype(np.float32), env
